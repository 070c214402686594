"""The HF PEFT adapter directory, in one place: its file names, key prefix and config fields, writing it, and reading
one that may be malformed or hostile (for check, import, verify and push).

An adapter directory holds `adapter_config.json` (a LoraConfig as JSON), `adapter_model.safetensors` (tensors keyed
`base_model.model.<HF module>.lora_A.weight`, ...) and a `README.md` model card; peft's multi-adapter layout adds one
such directory per further adapter, as a subdirectory. Older peft wrote `adapter_model.bin` (a torch.save file),
whose header is read without unpickling anything.

Reading: every problem is an AdapterFileError that names the file and what was expected: a config that is not a
JSON object or whose LoRA fields have wrong types or values, patterns that `patterns` refuses (beyond what it
matches at a bounded cost, or what peft's own regex engine would backtrack on for ever), a safetensors header
that lies (offsets outside the file, sizes that do not match shapes and dtypes, a truncated file), shapes that
contradict the config, and NaN or Inf values.
Files are opened through safe_read: regular files inside the adapter directory (a FIFO, device or a link
leaving the directory is refused), sizes from the opened file. Nothing here imports transformers or peft;
tensors are read one at a time. The config dict and the model card text are built by `core.peft_format`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from ..core.brief import brief
from ..core.patterns import PatternSet, check_pattern
from ..core.peft_names import (
    ADAPTER_BIN,
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    FILES,
    MAX_CARD_BYTES,
    MODEL_CARD,
    PEFT_PREFIX,
    hf_key,
)
from ..errors import AdapterFileError, ExportError, NonFiniteError, OutputError
from . import (
    atomic_dir,  # by module: its fsync is what the crash tests replace
    safetensors_out,
)
from .atomic_dir import is_published_adapter
from .safe_read import open_regular
from .safetensors_in import SafetensorsFile, open_safetensors

__all__ = ["ADAPTER_BIN", "FILES", "MAX_CARD_BYTES", "PEFT_PREFIX", "hf_key", "is_published_adapter"]

MAX_CONFIG_BYTES = 1 << 20
MAX_RANK = 1 << 20
FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
_ROLE = re.compile(r"^(?P<module>.+)\.(?P<role>lora_A\.weight|lora_B\.weight|lora_magnitude_vector)$")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _check_fields(config: dict[str, Any], where: str) -> None:
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f'peft_type: expected "LORA", found {config.get("peft_type")!r:.40}')
    r = config.get("r")
    if not (_is_int(r) and 1 <= r <= MAX_RANK):
        problems.append(f"r: expected an integer from 1 to {MAX_RANK}, found {r!r:.40}")
    if not _is_real(config.get("lora_alpha")):
        problems.append(f"lora_alpha: expected a finite number, found {config.get('lora_alpha')!r:.40}")
    for name in ("use_dora", "use_rslora"):
        if config.get(name) is not None and not isinstance(config[name], bool):
            problems.append(f"{name}: expected true or false, found {config[name]!r:.40}")
    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        problems.append(f"base_model_name_or_path: expected a string, found {type(base).__name__}")
    for name, valid, expected in (
        ("rank_pattern", lambda v: _is_int(v) and 1 <= v <= MAX_RANK, "ranks"),
        ("alpha_pattern", _is_real, "finite numbers"),
    ):
        value = config.get(name)
        if value is not None and not (isinstance(value, dict) and all(valid(v) for v in value.values())):
            problems.append(f"{name}: expected a mapping of module patterns to {expected}, found {value!r:.60}")
    problems += _check_peft_regex_fields(config)
    if problems:
        raise AdapterFileError(f"{where}: {'; '.join(problems)}")
    for name in ("target_modules", "exclude_modules"):  # peft fullmatches a string against every module name
        if isinstance(config.get(name), str):
            check_pattern(config[name], f"{where}: {name}")
    for name in ("modules_to_save", "layers_pattern"):  # peft puts each inside a regular expression of its own
        value = config.get(name)
        for pattern in [value] if isinstance(value, str) else value or []:
            check_pattern(pattern, f"{where}: {name}", repeats=1)
    for name in ("rank_pattern", "alpha_pattern"):
        for key in config.get(name) or {}:
            check_pattern(key, f"{where}: {name}")


def _check_peft_regex_fields(config: dict[str, Any]) -> list[str]:
    """Types of the fields peft matches against module names, turns into regular expressions or layer filters (their
    patterns: `_check_fields`)."""
    problems = []
    for name in ("target_modules", "target_parameters", "exclude_modules", "modules_to_save", "layers_pattern"):
        value = config.get(name)
        if (
            value is not None
            and not isinstance(value, str)
            and not (isinstance(value, list) and all(isinstance(v, str) for v in value))
        ):
            problems.append(f"{name}: expected a list of module names or one pattern, found {brief(value)}")
    layers = config.get("layers_to_transform")
    if layers is not None and not _is_int(layers) and not (isinstance(layers, list) and all(map(_is_int, layers))):
        problems.append(f"layers_to_transform: expected a layer index or a list of them, found {brief(layers)}")
    return problems


def read_config(path: str | Path) -> dict[str, Any]:
    """adapter_config.json, checked: a JSON object with peft_type LORA and well-typed LoRA fields."""
    path = Path(path)
    if not os.path.lexists(path):
        raise AdapterFileError(
            f"{path}: missing; expected an HF PEFT adapter directory ({ADAPTER_CONFIG}, {ADAPTER_WEIGHTS})"
        )
    with open_regular(
        path, within=path.parent, error=AdapterFileError, what=f"an adapter config ({ADAPTER_CONFIG})"
    ) as f:
        if f.size > MAX_CONFIG_BYTES:
            raise AdapterFileError(
                f"{path}: {f.size} bytes; expected an adapter config of at most {MAX_CONFIG_BYTES} bytes"
            )
        try:
            config = json.loads(f.read().decode("utf-8"), parse_constant=_reject_constant)
        except (OSError, ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            detail = "nested too deeply" if isinstance(exc, RecursionError) else " ".join(str(exc).split())[:200]
            raise AdapterFileError(f"{path}: not a readable JSON adapter config ({detail})") from None
    if not isinstance(config, dict):
        raise AdapterFileError(f"{path}: expected a JSON object, found {type(config).__name__}")
    _check_fields(config, str(path))
    return config


@contextlib.contextmanager
def weights_file(path: str | Path) -> Iterator[SafetensorsFile]:
    """The adapter weights, opened and their header checked (`safetensors_in`): a regular file inside its directory,
    read from its descriptor, never mapped into memory (a file cut by another process while mapped kills the reader
    with SIGBUS)."""
    path = Path(path)
    if not os.path.lexists(path):
        raise AdapterFileError(f"{path}: missing; expected the adapter weights ({ADAPTER_WEIGHTS})")
    with open_safetensors(
        path, within=path.parent, error=AdapterFileError, what=f"the adapter weights ({ADAPTER_WEIGHTS})"
    ) as f:
        yield f


def read_header(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """key -> (dtype, shape) of a safetensors file, from its header, checked against the file (`safetensors_in`:
    offsets inside it, back to back, sizes matching shapes and dtypes); only floating-point tensors."""
    path = Path(path)
    with weights_file(path) as f:
        found = {key: (entry.dtype, entry.shape) for key, entry in f.entries.items()}
    odd = sorted(f"{key} ({dtype})" for key, (dtype, _) in found.items() if dtype not in FLOAT_DTYPES)
    if odd:
        raise AdapterFileError(
            f"{path}: expected floating-point adapter tensors ({', '.join(FLOAT_DTYPES)}), found {', '.join(odd[:5])}"
        )
    return found


_BIN_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}


def read_bin_header(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """key -> (dtype, shape) of peft's older weights file (`adapter_model.bin`, a torch.save of a state dict), read
    without torch.load: its zip directory and pickle are checked, only tensors and plain data are built (nothing of
    the file runs, no tensor data is read); dtypes named as safetensors names them."""
    from .torch_save import RefusedGlobal, StoredTensor, load_torch_file

    path = Path(path)
    if not os.path.lexists(path):
        raise AdapterFileError(f"{path}: missing; expected the adapter weights ({ADAPTER_BIN})")
    with open_regular(
        path, within=path.parent, error=AdapterFileError, what=f"the adapter weights ({ADAPTER_BIN})"
    ) as f:
        try:
            state = load_torch_file(f)
        except RefusedGlobal as exc:
            raise AdapterFileError(
                f"{path}: refused, it needs unsafe unpickling ({exc} is not loaded: only tensors and plain data "
                f"are); nothing of it ran"
            ) from None
        except Exception as exc:  # noqa: BLE001 - whatever a malformed zip or pickle raises is bad input
            raise AdapterFileError(
                f"{path}: not a readable torch.save file ({type(exc).__name__}: "
                f"{' '.join(str(exc).split())[:200]}); is it truncated or corrupt?"
            ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, StoredTensor) for k, v in state.items()
    ):
        raise AdapterFileError(f"{path}: expected a state dict (names to tensors), found {type(state).__name__}")
    return {
        key: (_BIN_DTYPES.get(t.dtype, str(t.dtype).removeprefix("torch.")), tuple(t.size)) for key, t in state.items()
    }


def check_shapes(config: dict[str, Any], header: Mapping[str, tuple[str, tuple[int, ...]]], where: str) -> None:
    """LoRA shapes against the config: A [r, in], B [out, r] with the module's r, DoRA magnitudes [out] only with
    use_dora (`check_ranks` of a safetensors header)."""
    check_ranks(config, {key: shape for key, (_, shape) in header.items()}, where)


_A_KEY, _B_KEY = ".lora_A.weight", ".lora_B.weight"


def _ranks_agree(
    config: Mapping[str, Any],
    shapes: Mapping[str, tuple[int, ...]],
    roles: tuple[set[tuple[int, ...]], set[tuple[int, ...]]] | None = None,
) -> bool:
    """A sufficient condition for `check_ranks` to find nothing, checked on the distinct shapes (an MoE adapter has
    10^5 keys and a few shapes): no rank_pattern, no DoRA magnitude, no newline in a key (so every key `_ROLE` gives a
    role ends in its suffix), and every lora_A-suffixed key [r, in], every lora_B one [out, r] with the config's r;
    then each module's A and B have rank r, so they agree. False means: check module by module. `roles`: `check_ranks`'
    (the keys all lora_A or lora_B keys, known without a pass here)."""
    if config.get("rank_pattern") not in (None, {}):
        return False
    if roles is not None:
        a_shapes, b_shapes = roles
    else:
        keys = "\n".join(shapes)
        if "lora_magnitude_vector" in keys or keys.count("\n") >= len(shapes):
            return False
        a_shapes = {shape for key, shape in shapes.items() if key.endswith(_A_KEY)}
        b_shapes = {shape for key, shape in shapes.items() if key.endswith(_B_KEY)}
    r = config.get("r")
    return all(len(a) == 2 and a[0] == r for a in a_shapes) and all(len(b) == 2 and b[1] == r for b in b_shapes)


def check_ranks(
    config: Mapping[str, Any],
    shapes: Mapping[str, tuple[int, ...]],
    where: str,
    roles: tuple[set[tuple[int, ...]], set[tuple[int, ...]]] | None = None,
) -> None:
    """`check_shapes` of key -> shape. `roles`: the distinct shapes of the lora_A keys and of the lora_B keys when
    every key is one of them (ends in `.lora_A.weight` or `.lora_B.weight`) and holds no newline (so none is a DoRA
    magnitude), as a caller that has read the keys knows; else None."""
    if _ranks_agree(config, shapes, roles):
        return
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        match = _ROLE.match(key)
        if match:
            modules.setdefault(match["module"].removeprefix(PEFT_PREFIX), {})[match["role"]] = shape
    fused = bool(config.get("target_parameters"))
    problems = []
    rank_pattern = PatternSet(config.get("rank_pattern"), f"{where}: rank_pattern")
    for module, roles in sorted(modules.items()):
        a, b, magnitude = roles.get("lora_A.weight"), roles.get("lora_B.weight"), roles.get("lora_magnitude_vector")
        r = rank_pattern.get(module, config["r"])
        ranks = []
        if a is not None:
            ranks.append(("lora_A", a[0] if len(a) == 2 else None, a))
        if b is not None:
            ranks.append(("lora_B", b[1] if len(b) == 2 else None, b))
        for role, rank, shape in ranks:
            if rank is None or not (rank == r or (fused and rank % r == 0)):
                problems.append(
                    f"{module}.{role} has shape {list(shape)}, expected rank {r} from the config "
                    f"({'[r, in]' if role == 'lora_A' else '[out, r]'})"
                )
        if a is not None and b is not None and len(a) == len(b) == 2 and a[0] != b[1]:
            problems.append(f"{module}: lora_A has rank {a[0]} but lora_B has rank {b[1]}")
        if magnitude is not None:
            if not config.get("use_dora"):
                problems.append(f"{module}.lora_magnitude_vector is present but use_dora is false")
            elif len(magnitude) != 1 or (b is not None and magnitude[0] != b[0]):
                problems.append(
                    f"{module}.lora_magnitude_vector has shape {list(magnitude)}, expected [{b[0] if b else 'out'}]"
                )
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise AdapterFileError(f"{where}: shapes contradict {ADAPTER_CONFIG}: {'; '.join(problems[:5])}{more}")


def _all_finite(tensor: torch.Tensor) -> bool:
    """A finite sum means every value is finite (NaN and Inf propagate); only a sum that overflows needs the exact,
    ~17x slower element-wise check (bench/: isfinite().all() was 15% of an offline export)."""
    total = tensor.sum(dtype=torch.float64 if tensor.dtype == torch.float64 else torch.float32)
    return bool(torch.isfinite(total)) or bool(torch.isfinite(tensor).all())


_FINITE_BATCH_BYTES = 16 << 20


def nonfinite(tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """`key (n NaN, m Inf)` for every tensor holding NaN or Inf, in the order given.

    MoE adapters hold 10^4 to 10^5 small tensors, so they are checked in groups (one sum per group instead of a
    few ops per tensor): tensors of one dtype lying back to back in one CPU storage (as `safetensors_out.allocate`
    lays out an export's tensors) through one view of that memory, no copy; the others of one dtype together, up
    to 16 MiB at a time (one concatenation). Only a group whose sum is not finite is checked tensor by tensor.
    """
    found: list[tuple[int, str]] = []
    for joined, group in _finite_groups(tensors):
        if len(group) > 1 and _all_finite(joined):
            continue
        for n, key, tensor in group:
            if not _all_finite(tensor):
                found.append((n, f"{key} ({int(torch.isnan(tensor).sum())} NaN, {int(torch.isinf(tensor).sum())} Inf)"))
    return [message for _, message in sorted(found)]


_Item = tuple[int, str, torch.Tensor]


def _finite_groups(tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[torch.Tensor | None, list[_Item]]]:
    """(all values as one 1-D tensor, the group's items) for the floating tensors: runs lying back to back in one
    storage (a view), then the rest in batches of one dtype of up to _FINITE_BATCH_BYTES (a concatenation)."""
    adjacent: list[tuple[int, int, _Item]] = []
    rest: list[_Item] = []
    for n, (key, tensor) in enumerate(tensors):
        if not tensor.is_floating_point():
            continue
        tensor = tensor.detach()
        if tensor.device.type == "cpu" and tensor.is_contiguous() and tensor.numel():
            adjacent.append((tensor.untyped_storage().data_ptr(), tensor.data_ptr(), (n, key, tensor)))
        else:
            rest.append((n, key, tensor))
    adjacent.sort(key=lambda entry: (str(entry[2][2].dtype), entry[0], entry[1]))
    run: list[_Item] = []
    for k, (storage, address, item) in enumerate(adjacent):
        before = adjacent[k - 1] if k else None
        if run and not (before[0] == storage and before[2][2].dtype == item[2].dtype and _end(before[2][2]) == address):
            yield from _run_or_rest(run, rest)
            run = []
        run.append(item)
    yield from _run_or_rest(run, rest)
    batch: list[_Item] = []
    held = 0
    for item in sorted(rest, key=lambda item: (str(item[2].dtype), str(item[2].device), item[0])):
        size = item[2].numel() * item[2].element_size()
        if batch and (item[2].dtype, item[2].device) != (batch[0][2].dtype, batch[0][2].device):
            size = _FINITE_BATCH_BYTES + 1  # close the batch
        if batch and held + size > _FINITE_BATCH_BYTES:
            yield (torch.cat([t.reshape(-1) for _, _, t in batch]) if len(batch) > 1 else None), batch
            batch, held = [], 0
        batch.append(item)  # a tensor above the batch size is alone in its batch: checked as it is, never copied
        held += item[2].numel() * item[2].element_size()
    if batch:
        yield (torch.cat([t.reshape(-1) for _, _, t in batch]) if len(batch) > 1 else None), batch


def _end(tensor: torch.Tensor) -> int:
    return tensor.data_ptr() + tensor.numel() * tensor.element_size()


def _run_or_rest(run: list[_Item], rest: list[_Item]) -> Iterator[tuple[torch.Tensor | None, list[_Item]]]:
    """A run of tensors back to back in one storage as one view of it; a run of one joins the batched rest."""
    if len(run) < 2:
        rest.extend(run)
        return
    first = run[0][2]
    count = (_end(run[-1][2]) - first.data_ptr()) // first.element_size()
    yield first.as_strided((count,), (1,), first.storage_offset()), run


def check_finite(
    tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    *,
    allow: bool = False,
    remedy: str = "pass allow_nonfinite=True (--allow-nonfinite) to write it anyway",
) -> None:
    """Raise NonFiniteError naming every tensor with NaN or Inf, unless `allow`. A `safetensors_out.Payload` is
    checked one dtype's part of its buffer at a time, tensor by tensor only to name what is not finite."""
    if allow:
        return
    if isinstance(tensors, safetensors_out.Payload) and not any(
        not _all_finite(part) for part in tensors.parts() if part.is_floating_point()
    ):
        return
    found = nonfinite(tensors.items() if isinstance(tensors, Mapping) else tensors)
    if found:
        listed = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        raise NonFiniteError(
            f"{len(found)} adapter tensor(s) hold NaN or Inf values: {listed}; such an adapter gives NaN logits "
            f"(did training diverge?). Check the training run, or {remedy}"
        )


def file_tensors(path: str | Path) -> Iterable[tuple[str, torch.Tensor]]:
    """(key, tensor) of a safetensors file whose header was checked, one tensor in memory at a time."""
    with weights_file(path) as f:
        for key in f.keys():
            yield key, f.tensor(key)


def read_adapter(
    adapter_dir: str | Path,
    *,
    values: bool = False,
    allow_nonfinite: bool = False,
    remedy: str = "pass --allow-nonfinite to accept it",
) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """(config, key -> shape) of an adapter directory, every check above passed; `values` also reads every
    tensor and refuses NaN or Inf unless `allow_nonfinite`."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise AdapterFileError(
            f"{adapter_dir}: expected an HF PEFT adapter directory ({ADAPTER_CONFIG}, {ADAPTER_WEIGHTS}), found "
            f"{'a file' if adapter_dir.exists() else 'nothing'}"
        )
    config = read_config(adapter_dir / ADAPTER_CONFIG)
    header = read_header(adapter_dir / ADAPTER_WEIGHTS)
    check_shapes(config, header, str(adapter_dir))
    if values:
        check_finite(file_tensors(adapter_dir / ADAPTER_WEIGHTS), allow=allow_nonfinite, remedy=remedy)
    return config, {key: shape for key, (_, shape) in header.items()}


# ------------------------------------------------------------------------ directories


def adapter_dirs(directory: str | Path) -> dict[str, Path]:
    """peft's multi-adapter layout: the adapter at the root ("default") and one per subdirectory with a config."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ExportError(f"{directory} is not a directory; expected an HF PEFT adapter directory")
    found = {"default": directory} if (directory / ADAPTER_CONFIG).is_file() else {}
    for sub in sorted(directory.iterdir()):
        if sub.is_dir() and not sub.is_symlink() and not sub.name.startswith(".") and (sub / ADAPTER_CONFIG).is_file():
            found[sub.name] = sub
    if not found:
        raise ExportError(
            f"{directory}: no {ADAPTER_CONFIG} at the top or in a subdirectory; expected an HF PEFT adapter directory"
        )
    return found


def read_adapters(directory: str | Path) -> dict[str, tuple[Path, dict[str, Any], dict[str, tuple[int, ...]]]]:
    """(path, config, shapes) per adapter of a directory (`adapter_dirs`), each read with `read_adapter`."""
    return {name: (path, *read_adapter(path)) for name, path in adapter_dirs(directory).items()}


def has_config(directory: str | Path) -> bool:
    """Whether something (anything: a reader says what is wrong with it) is at the directory's config name."""
    return os.path.lexists(Path(directory) / ADAPTER_CONFIG)


def read_card(card: str | Path) -> str | None:
    """A model card as text; None when it is too large to be one this tool wrote."""
    with open(card, "rb") as f:
        data = f.read(MAX_CARD_BYTES + 1)
    return None if len(data) > MAX_CARD_BYTES else data.decode("utf-8", errors="replace")


# ------------------------------------------------------------------------ writing


def config_bytes(config: Mapping[str, Any]) -> bytes:
    """adapter_config.json's content: sorted keys, indented, one trailing newline."""
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


def write_config(directory: str | Path, config: Mapping[str, Any]) -> None:
    """Write (or replace: a link there is replaced, never followed) a directory's adapter_config.json."""
    path = Path(directory) / ADAPTER_CONFIG
    path.unlink(missing_ok=True)
    path.write_bytes(config_bytes(config))


def write_card(directory: str | Path, card: str) -> None:
    """Write (or replace: a link there is replaced, never followed) a directory's model card."""
    path = Path(directory) / MODEL_CARD
    path.unlink(missing_ok=True)
    path.write_text(card)


def append_card(directory: str | Path, text: str) -> None:
    """Append a section to a directory's model card."""
    with open(Path(directory) / MODEL_CARD, "a") as card:
        card.write(text)


def write_staging(
    tmp: Path,
    *,
    tensors: Mapping[str, torch.Tensor],
    config: dict[str, Any],
    card: str,
    extra_files: dict[str, bytes] | None = None,
) -> None:
    """Fill a staging directory (atomic_dir.staging_dir) with an adapter: weights, config and card (plus
    `extra_files`, relative path -> bytes), fsynced; on failure remove it, and name a write failure in one line."""
    files = {ADAPTER_CONFIG: config_bytes(config), MODEL_CARD: card.encode(), **(extra_files or {})}
    try:
        safetensors_out.save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        for name, data in files.items():
            path = (tmp / name).resolve()
            if tmp.resolve() not in path.parents:
                raise OutputError(f"refusing to write {name!r} outside the adapter directory")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        for name in (ADAPTER_WEIGHTS, *files):
            atomic_dir.fsync(tmp / name)
        atomic_dir.fsync(tmp)
    except BaseException as exc:
        atomic_dir.discard(tmp)
        if isinstance(exc, (OSError, SafetensorError)):
            nbytes = sum(t.numel() * t.element_size() for t in tensors.values()) + sum(len(d) for d in files.values())
            raise OutputError(atomic_dir.write_failure(exc, tmp.parent, nbytes)) from exc
        raise
