"""Property-based (hypothesis, derandomized): real checkpoints and adapter directories, mutated, read by the commands.

Each example copies a real input (a torch_dist checkpoint with ModelOpt LoRA written by dist_checkpointing.save, a
Megatron-Bridge TP2 one with run_config.yaml, a legacy mp_rank_00 checkpoint, an exported adapter directory),
applies one mutation (truncation, bit flips, overwritten bytes, lying offsets, lengths and shapes in `.metadata`,
wrong dtypes, swapped files, malformed recorded settings, tracker contents), and runs the offline export CLI in
process, or load_hf_adapter for adapters. For every example:
- exit 0 (import: no error) with a complete adapter, equal to the unmutated export when the mutation left every byte
  the adapter is made of intact (and exit 0 is then required when only base-weight bytes changed), or
- exit 2 with exactly one `error:` line (import: an ExportError with a one-line message, no parameter changed);
- never another exception, never a hang (each example runs under a 20 s alarm), never an output left behind on
  failure, never a changed input.
Everything runs in one forked rank under an address-space limit (RLIMIT_AS: what it has mapped + 3 GiB), so a
length that is allocated before it is checked fails the example instead of the machine. The classes tried and
their counts are asserted below and quoted in docs/guarantees.md.
"""

import contextlib
import hashlib
import io
import pickle
import random
import shutil
import signal
from collections import Counter
from pathlib import Path

import pytest

from tests.e2e.test_bad_input import _save_legacy
from tests.e2e.test_offline_export import ITERATION, _train_save_and_export_live
from tests.support.multiprocess import run_ranks

pytestmark = pytest.mark.timeout(900)
ITER = f"iter_{ITERATION:07d}"
EXAMPLES = {"modelopt": 100, "bridge": 40, "legacy": 30, "adapter": 60}
"""Examples per input: 170 exports and 60 imports."""
ALARM_S = 20
EXTRA_ADDRESS_SPACE = 3 << 30


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    run_ranks(_train_save_and_export_live, 1, str(tmp / "modelopt"), 1, 1, "modelopt")
    run_ranks(_train_save_and_export_live, 2, str(tmp / "bridge"), 2, 1, "lora")
    run_ranks(_save_legacy, 1, str(tmp / "legacy" / "save"), None)
    return tmp


# ------------------------------------------------------------------------------------------------ mutations
# Each takes (rng, checkpoint iteration directory, facts) and returns (what it did, whether every byte the adapter is
# made of is intact, whether only base-weight bytes changed). `facts` holds the unmutated checkpoint's adapter byte
# ranges, keys, file sizes and args.


def _files(iteration: Path) -> list[Path]:
    return sorted(p for p in iteration.rglob("*") if p.is_file() and p.name != "metadata.json")


def _touches_adapter(facts, path: Path, start: int, end: int) -> bool:
    """Whether bytes [start, end) of `path` hold adapter data or anything else export reads (every other file)."""
    if path.suffix != ".distcp":
        return True
    return any(s < end and start < e for s, e in facts["adapter_ranges"].get(path.name, []))


def truncate(rng, iteration, facts):
    path = rng.choice(_files(iteration))
    size = path.stat().st_size
    cut = rng.choice([0, 1, size // 2, size - 1, rng.randrange(size + 1)]) if size else 0
    path.write_bytes(path.read_bytes()[:cut])
    intact = not _touches_adapter(facts, path, cut, size)
    return f"truncation of {_kind(path)}", intact, intact


def flip_bits(rng, iteration, facts):
    path = rng.choice([p for p in _files(iteration) if p.stat().st_size])
    data = bytearray(path.read_bytes())
    positions = [rng.randrange(len(data)) for _ in range(rng.choice([1, 2, 8, 64]))]
    for at in positions:
        data[at] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    intact = not any(_touches_adapter(facts, path, at, at + 1) for at in positions)
    return f"bit flips in {_kind(path)}", intact, intact


def overwrite(rng, iteration, facts):
    path = rng.choice([p for p in _files(iteration) if p.stat().st_size])
    data = bytearray(path.read_bytes())
    start = rng.randrange(len(data))
    length = min(len(data) - start, rng.choice([4, 64, 4096]))
    data[start : start + length] = bytes(rng.randrange(256) for _ in range(length))
    path.write_bytes(bytes(data))
    intact = not _touches_adapter(facts, path, start, start + length)
    return f"overwritten bytes of {_kind(path)}", intact, intact


def swap_files(rng, iteration, facts):
    a, b = rng.sample(_files(iteration), 2)
    data = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(data)
    return f"swapped files ({_kind(a)}, {_kind(b)})", False, False


def _kind(path: Path) -> str:
    kind = {".distcp": ".distcp", ".pt": path.name, ".yaml": "run_config.yaml", ".txt": "tracker"}.get(
        path.suffix, path.name
    )
    return f"modelopt_state/{kind}" if path.parent.name == "modelopt_state" else kind


INTS = [0, 1, 7, -1, 2**31, 2**40, 2**63, 3.5, "8", None, True]


def _edit_metadata(iteration, edit):
    with open(iteration / ".metadata", "rb") as f:  # the fuzz's own checkpoint: a plain pickle is fine here
        metadata = pickle.load(f)
    edit(metadata)
    (iteration / ".metadata").write_bytes(pickle.dumps(metadata))


def lie_in_metadata(rng, iteration, facts):
    """Lying offsets, lengths, file names, shapes, chunks and dtypes; missing, extra and retyped fields."""
    import torch
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    what = rng.choice(
        [
            "item offset",
            "item length",
            "item file",
            "tensor size",
            "chunk offsets",
            "chunk sizes",
            "dtype",
            "drop item",
            "drop chunk",
            "duplicate chunk",
            "bytes entry",
            "field retyped",
            "extra attribute",
        ]
    )

    def edit(metadata):
        key = rng.choice(sorted(k for k in facts["adapter_keys"] if k in metadata.state_dict_metadata))
        tensor = metadata.state_dict_metadata[key]
        item_key = rng.choice([k for k in metadata.storage_data if k.fqn == key])
        item = metadata.storage_data[item_key]
        chunk = rng.choice(tensor.chunks)
        if what == "item offset":
            item.offset = rng.choice(INTS + [item.offset + 1, item.offset - 1, facts["sizes"][item.relative_path]])
        elif what == "item length":
            item.length = rng.choice(INTS + [item.length + 1, item.length - 1])
        elif what == "item file":
            item.relative_path = rng.choice(
                ["../common.pt", "common.pt", ".metadata", "nothing.distcp", "", "/etc/passwd", *facts["sizes"]]
            )
        elif what == "tensor size":
            tensor.size = torch.Size(rng.choice([[], [8], [0, 64], [8, 64, 1], [2**20, 64], [64, 8]]))
        elif what in ("chunk offsets", "chunk sizes"):
            value = torch.Size(rng.choice([[0, 0], [1, 0], [0, 2**30], [8, 64], [4, 64], [0]]))
            setattr(chunk, "offsets" if what == "chunk offsets" else "sizes", value)
        elif what == "dtype":
            tensor.properties.dtype = rng.choice(
                [torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.uint8, torch.bool, torch.complex64]
            )
        elif what == "drop item":
            del metadata.storage_data[item_key]
        elif what == "drop chunk":
            tensor.chunks.remove(chunk)
        elif what == "duplicate chunk":
            tensor.chunks.append(chunk)
        elif what == "bytes entry":
            metadata.state_dict_metadata[key] = BytesStorageMetadata()
        elif what == "field retyped":
            target, field = rng.choice(
                [
                    (tensor, "size"),
                    (tensor, "chunks"),
                    (tensor, "properties"),
                    (item, "offset"),
                    (item, "relative_path"),
                    (metadata, "state_dict_metadata"),
                    (metadata, "storage_data"),
                    (chunk, "offsets"),
                ]
            )
            setattr(target, field, rng.choice([None, "x", 3, [1, "a"], {"a": 1}]))
        else:
            rng.choice([tensor, item, chunk, metadata]).injected = rng.choice([1, "x", None])

    _edit_metadata(iteration, edit)
    return f"lying metadata ({what})", False, False


def malformed_settings(rng, iteration, facts):
    """Recorded settings a real run would not write: args, ModelOpt's config, run_config.yaml, the tracker."""
    import argparse

    import torch

    value = rng.choice([0, -3, 2**40, 2.5, "64", None, True, [64], {"a": 1}])
    targets = (
        ["tracker", "run_config"]
        + ["args"] * (iteration / "common.pt").is_file()
        + ["modelopt"] * (iteration / "modelopt_state" / "common.pt").is_file()
    )
    target = rng.choice(targets)
    if target == "args":
        if facts["args"] is not None and rng.random() < 0.7:
            args = argparse.Namespace(**vars(facts["args"]))
            setattr(args, rng.choice(sorted(vars(args))), value)
            common = {"args": args, "iteration": ITERATION}
        else:
            common = rng.choice([value, {"args": value}, [value]])
        torch.save(common, iteration / "common.pt")
    elif target == "modelopt":
        config = {
            "adapter_name": "default",
            "adapter_cfg": rng.choice(
                [value, {"*": {"rank": value, "scale": 1.5}}, {"*": {"rank": 8, "scale": value}}, {"*": value}]
            ),
        }
        torch.save(
            rng.choice(
                [{"modelopt_state_dict": [("peft", {"config": config})]}, {"modelopt_state_dict": value}, value]
            ),
            iteration / "modelopt_state" / "common.pt",
        )
    elif target == "run_config":
        (iteration / "run_config.yaml").write_text(
            rng.choice(
                [
                    "model: [1, 2",
                    "- a\n- b\n",
                    "model: 3\n",
                    "peft: {alpha: abc}\n",
                    "model: {num_layers: -4}\n",
                    "a: &a [*a]\n",
                    "peft: {alpha: .inf}\n",
                    "\x00\x01",
                    "model: {hidden_size: 1e400}\n",
                ]
            )
        )
    else:
        (iteration.parent / "latest_checkpointed_iteration.txt").write_bytes(
            rng.choice([b"", b"abc", b"-5", b"5" * 5000, b"\xff\xfe", b"release", b"00005\n"])
        )
    return f"malformed settings ({target})", False, False


CHECKPOINT_MUTATIONS = [truncate, flip_bits, overwrite, swap_files, lie_in_metadata, malformed_settings]
LEGACY_MUTATIONS = [truncate, flip_bits, overwrite, malformed_settings]


# ---------------------------------------------------------------------------------------------- the property


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang(f"no answer within {ALARM_S} s")


def _export(argv) -> tuple[int | None, str, str | None]:
    """(exit status, stderr, the escaped exception's traceback or None)."""
    import traceback

    from megatron_peft_export.cli import main

    err = io.StringIO()
    signal.alarm(ALARM_S)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return main([*argv, "--quiet"]), err.getvalue(), None
    except BaseException:  # noqa: BLE001 - anything escaping main is what the property forbids
        return None, err.getvalue(), traceback.format_exc()
    finally:
        signal.alarm(0)


def _check_outcome(status, err, escaped, out: Path, baseline: Path, intact: bool, base_only: bool, what: str) -> str:
    from megatron_peft_export.io.peft_dir import read_adapter

    assert escaped is None, f"{what}: an exception escaped:\n{escaped}"
    assert status in (0, 2), f"{what}: exit status {status}\n{err}"
    if status == 2:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, (
            f"{what}: expected one error line, found\n{err}"
        )
        assert not out.exists() and not list(out.parent.glob(f".{out.name}*")), (
            f"{what}: output left behind after an error"
        )
        assert not base_only, f"{what}: only base-weight bytes changed, yet the export failed: {lines[0]}"
        return "exit 2"
    read_adapter(out, values=True, allow_nonfinite=True)  # complete and well-formed, whatever the values
    if intact:  # README.md names the source checkpoint, which differs
        files = ("adapter_model.safetensors", "adapter_config.json")
        assert [_digest(out)[f] for f in files] == [_digest(baseline)[f] for f in files], f"{what}: a different adapter"
    shutil.rmtree(out)
    return "exit 0, the unmutated export" if intact else "exit 0"


def _facts(iteration: Path) -> dict:
    from megatron_peft_export.offline.keys import classify

    facts = {
        "adapter_ranges": {},
        "adapter_keys": set(),
        "sizes": {p.name: p.stat().st_size for p in iteration.glob("*.distcp")},
        "args": None,
    }
    if (iteration / ".metadata").is_file():
        with open(iteration / ".metadata", "rb") as f:
            metadata = pickle.load(f)
        for index, info in metadata.storage_data.items():
            if classify(index.fqn) is not None:
                facts["adapter_keys"].add(index.fqn)
                facts["adapter_ranges"].setdefault(info.relative_path, []).append(
                    (info.offset, info.offset + info.length)
                )
    if (iteration / "common.pt").is_file():
        import torch

        facts["args"] = torch.load(iteration / "common.pt", weights_only=False).get("args")  # the fuzz's own file
    return facts


def _fuzz_checkpoints(rank, world, root, kind, examples, seed):
    import resource

    import torch
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    torch.set_num_threads(1)
    root = Path(root)
    save = root / kind / "save" if kind != "legacy" else root / "legacy" / "save"
    iteration = save / ITER
    baseline, scratch = root / f"{kind}-baseline", root / f"{kind}-scratch"
    status, err, escaped = _export(["export", str(iteration), "--output", str(baseline)])
    assert status == 0 and escaped is None, err + str(escaped)
    facts = _facts(iteration)
    mapped = next(
        int(line.split()[1]) * 1024
        for line in Path("/proc/self/status").read_text().splitlines()
        if line.startswith("VmSize:")
    )
    resource.setrlimit(resource.RLIMIT_AS, (mapped + EXTRA_ADDRESS_SPACE, resource.getrlimit(resource.RLIMIT_AS)[1]))
    signal.signal(signal.SIGALRM, _alarm)
    mutations = LEGACY_MUTATIONS if kind == "legacy" else CHECKPOINT_MUTATIONS
    tried: Counter = Counter()

    @settings(
        max_examples=examples, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(mutation=st.sampled_from(mutations), entropy=st.integers(0, 2**32))
    def example(mutation, entropy):
        rng = random.Random(entropy ^ seed)
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.copytree(save, scratch / "save")
        target = scratch / "save" / ITER
        what, intact, base_only = mutation(rng, target, facts)
        before = _digest(scratch / "save")
        source = scratch / "save" if what == "malformed settings (tracker)" else target
        out = scratch / "out"
        status, err, escaped = _export(["export", str(source), "--output", str(out)])
        outcome = _check_outcome(status, err, escaped, out, baseline, intact, base_only, what)
        assert _digest(scratch / "save") == before, f"{what}: the export changed its input"
        tried[(what, outcome)] += 1

    example()
    return dict(tried)


def _fuzz_adapters(rank, world, root, examples, seed):
    """Mutated copies of an exported adapter through load_hf_adapter (the import path verify and push share the reader
    of)."""
    import resource

    import torch
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from megatron_peft_export import ExportError, load_hf_adapter
    from tests.support.tiny_gpt import TinyGPTConfig, apply_modelopt_lora, build_gpt, init_parallel

    torch.set_num_threads(1)
    init_parallel(1)
    model = apply_modelopt_lora(build_gpt(TinyGPTConfig()), scale=1.5)
    lora = {n: p for n, p in model.named_parameters() if "lora" in n}
    good = Path(root) / "modelopt" / "live"
    load_hf_adapter(model, good)
    expected = {n: p.detach().clone() for n, p in lora.items()}
    mapped = next(
        int(line.split()[1]) * 1024
        for line in Path("/proc/self/status").read_text().splitlines()
        if line.startswith("VmSize:")
    )
    resource.setrlimit(resource.RLIMIT_AS, (mapped + EXTRA_ADDRESS_SPACE, resource.getrlimit(resource.RLIMIT_AS)[1]))
    signal.signal(signal.SIGALRM, _alarm)
    scratch = Path(root) / "adapter-scratch"
    tried: Counter = Counter()
    weights = "adapter_model.safetensors"

    def mutate(rng, adapter):
        names = ["adapter_config.json", weights]
        path = adapter / rng.choice(names)
        data = bytearray(path.read_bytes())
        kind = rng.choice(["truncate", "flip bits", "overwrite header bytes", "swap files", "header length"])
        if kind == "truncate":
            data = data[: rng.randrange(len(data) + 1)]
        elif kind == "flip bits":
            for _ in range(rng.choice([1, 4, 32])):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif kind == "overwrite header bytes":
            start = rng.randrange(min(len(data), 600))
            data[start : start + 8] = bytes(rng.randrange(256) for _ in range(8))
        elif kind == "swap files":
            other = adapter / names[path.name == names[0]]
            data, swapped = bytearray(other.read_bytes()), path.read_bytes()
            other.write_bytes(swapped)
        else:
            path = adapter / weights
            data = bytearray(path.read_bytes())
            data[:8] = rng.choice([0, 1, 2**40, 2**63, len(data), len(data) - 8]).to_bytes(8, "little")
        path.write_bytes(bytes(data))
        return f"{kind} ({'weights' if path.name == weights else 'config'})"

    @settings(
        max_examples=examples, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(entropy=st.integers(0, 2**32))
    def example(entropy):
        rng = random.Random(entropy ^ seed)
        trial(lambda adapter: mutate(rng, adapter))

    def flip_lowest_mantissa_bit(adapter):
        """A mutation that must load: one value changed in its last mantissa bit, still finite."""
        path = adapter / weights
        data = bytearray(path.read_bytes())
        data[8 + int.from_bytes(data[:8], "little")] ^= 1  # the first data byte: the lowest bits of a float32
        path.write_bytes(bytes(data))
        return "flip bits (weights)"

    def trial(mutation):
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.copytree(good, scratch)
        what = mutation(scratch)
        before = _digest(scratch)
        with torch.no_grad():
            for p in lora.values():
                p.fill_(0.25)
        signal.alarm(ALARM_S)
        try:
            load_hf_adapter(model, scratch)
            outcome = "loaded"
        except ExportError as exc:
            assert "\n" not in str(exc), f"{what}: a multi-line error: {exc}"
            assert all(bool((p == 0.25).all()) for p in lora.values()), f"{what}: a refused import changed parameters"
            outcome = "refused"
        finally:
            signal.alarm(0)
        if outcome == "loaded" and _digest(scratch)[weights] == _digest(good)[weights]:
            assert all(torch.equal(lora[n], expected[n]) for n in lora), (
                f"{what}: intact weights loaded as different values"
            )
        assert _digest(scratch) == before, f"{what}: the import changed its input"
        tried[(what, outcome)] += 1

    example()
    # hypothesis derives its examples from this function's source: whichever they are, one mutation that must
    # load is tried too, so "both outcomes occur" does not hang on which bits the examples flipped
    trial(flip_lowest_mantissa_bit)
    return dict(tried)


def _classes(tried: dict) -> set[str]:
    return {what.split(" (")[0].split(" of ")[0].split(" in ")[0] for what, _ in tried}


def _report(name: str, tried: dict) -> None:
    print(
        f"\n{name}: {sum(tried.values())} examples: "
        + ", ".join(f"{what} -> {outcome}: {n}" for (what, outcome), n in sorted(tried.items()))
    )


@pytest.mark.parametrize("kind", ["modelopt", "bridge", "legacy"])
def test_mutated_checkpoints_export_correctly_or_exit_2_with_one_line(inputs, kind):
    tried = run_ranks(_fuzz_checkpoints, 1, str(inputs), kind, EXAMPLES[kind], 14, timeout=600)[0]
    _report(kind, tried)
    assert sum(tried.values()) == EXAMPLES[kind]
    expected = {"truncation", "bit flips", "overwritten bytes", "malformed settings"} | (
        {"swapped files", "lying metadata"} if kind != "legacy" else set()
    )
    assert _classes(tried) == expected, sorted(_classes(tried))
    outcomes = {outcome for _, outcome in tried}
    assert "exit 2" in outcomes and outcomes & {"exit 0", "exit 0, the unmutated export"}, (
        "both outcomes occur: the mutations reach the reader"
    )


def test_mutated_adapters_load_correctly_or_are_refused_with_one_line(inputs):
    tried = run_ranks(_fuzz_adapters, 1, str(inputs), EXAMPLES["adapter"], 14, timeout=600)[0]
    _report("adapter", tried)
    assert sum(tried.values()) == EXAMPLES["adapter"] + 1  # and the one that must load
    assert _classes(tried) == {"truncate", "flip bits", "overwrite header bytes", "swap files", "header length"}, (
        sorted(_classes(tried))
    )
    assert {outcome for _, outcome in tried} == {"loaded", "refused"}
