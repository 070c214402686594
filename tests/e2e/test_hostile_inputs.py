"""Hostile and broken files where the commands read them: a payload whose unpickling would create a marker file,
planted in every kind of file the readers open; FIFOs in place of files (each command returns within seconds);
lengths that claim far more than the file holds, under an address-space limit; and the malformed values that
used to escape as tracebacks. Every case: exit status 2 (or an ExportError from load_hf_adapter), one `error:`
line, no marker, nothing written, the input unchanged."""

import hashlib
import io
import os
import pickle
import shutil
from pathlib import Path

import pytest

from tests.e2e.test_offline_export import ITERATION, _train_save_and_export_live
from tests.e2e.test_verify import _hook_run
from tests.support import hostile_pickles as hp
from tests.support.multiprocess import run_alone, run_ranks

pytestmark = pytest.mark.timeout(600)
ITER = f"iter_{ITERATION:07d}"
LORA_A = "decoder.layers.0.self_attention.linear_qkv.lora_a_default.weight"
HANG_S = 30  # a command that has not answered by then is hanging (each answers in well under a second once imported)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """ckpt/: a torch_dist checkpoint of the tiny model with ModelOpt LoRA (save/) and its live export (live/);
    verified/: an adapter with its verification reference (save/iter_0000001/hf_adapter) and the HF base model
    (base/)."""
    tmp = tmp_path_factory.mktemp("hostile")
    run_ranks(_train_save_and_export_live, 1, str(tmp / "ckpt"), 1, 1, "modelopt")
    run_ranks(_hook_run, 1, str(tmp / "verified"))
    return tmp


class _Exploit:
    """Unpickling this runs os.mkdir(marker): the payload of every gadget below."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _cli(argv):
    """The CLI in a forked process: (exit status, stderr); a hang is killed after HANG_S seconds (TimeoutError)."""

    def run(argv):
        import contextlib
        import io

        from megatron_peft_export.cli import main

        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            status = main([*argv, "--quiet"] if argv[0] in ("export", "verify") else argv)
        return status, err.getvalue()

    return run_alone(run, argv, timeout=HANG_S)


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "special"
        for p in sorted(root.rglob("*"))
        if p.is_file() or p.is_fifo()
    }


def _refused(
    tmp: Path, argv, fragment, source: Path, marker: Path | None = None, memory_limit: int | None = None
) -> str:
    before = _tree(source)
    status, err = _cli_limited(argv, memory_limit) if memory_limit else _cli(argv)
    assert status == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err
    assert marker is None or not marker.exists(), "the payload ran"
    assert _tree(source) == before, "the input changed"
    assert not (tmp / "out").exists() and not list(tmp.glob(".out*")), "something was written"
    return lines[0]


def _checkpoint(world, tmp) -> Path:
    shutil.copytree(world / "ckpt" / "save", tmp / "save")
    return tmp / "save" / ITER


def _edit_metadata(iteration: Path, edit) -> None:
    with open(iteration / ".metadata", "rb") as f:  # the test's own checkpoint: a plain pickle.load is fine here
        metadata = pickle.load(f)
    edit(metadata)
    (iteration / ".metadata").write_bytes(pickle.dumps(metadata))


def _append(path: Path, data: bytes) -> int:
    offset = path.stat().st_size
    with open(path, "ab") as f:
        f.write(data)
    return offset


def _torch_save(obj, path) -> None:
    import torch

    if isinstance(path, Path):
        path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)


def _export(tmp, iteration):
    return ["export", str(iteration), "--output", str(tmp / "out")]


# ------------------------------------------------------------------------------------------------------ gadgets


def _bytes_entry_gadget(iteration: Path, marker: Path, copy_fields: bool = True):
    """The chain of the report: an adapter key declared as BytesStorageMetadata (with the tensor's size, chunks and
    properties copied onto it) whose stored item is a torch.save payload; torch's loader would unpickle it freely."""
    import io

    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    payload = io.BytesIO()
    _torch_save(_Exploit(marker), payload)
    offset = _append(iteration / "__0_0.distcp", payload.getvalue())

    def edit(metadata):
        tensor = metadata.state_dict_metadata[LORA_A]
        fake = BytesStorageMetadata()
        if copy_fields:
            fake.size, fake.chunks, fake.properties = tensor.size, tensor.chunks, tensor.properties
        metadata.state_dict_metadata[LORA_A] = fake
        info = next(v for k, v in metadata.storage_data.items() if k.fqn == LORA_A)
        info.relative_path, info.offset, info.length = "__0_0.distcp", offset, len(payload.getvalue())
        metadata.storage_data[MetadataIndex(LORA_A)] = info

    _edit_metadata(iteration, edit)


def _distcp_gadget(iteration: Path, marker: Path):
    import io

    payload = io.BytesIO()
    _torch_save((_Exploit(marker), b"\0" * 4096), payload)  # padded to the tensor's size, so that it gets decoded
    offset = _append(iteration / "__0_0.distcp", payload.getvalue())

    def edit(metadata):
        info = next(v for k, v in metadata.storage_data.items() if k.fqn == LORA_A)
        info.relative_path, info.offset, info.length = "__0_0.distcp", offset, len(payload.getvalue())

    _edit_metadata(iteration, edit)


def _extra_attribute(iteration: Path, marker: Path):
    def edit(metadata):
        metadata.state_dict_metadata[LORA_A].evil = "anything"

    _edit_metadata(iteration, edit)


GADGETS = {  # case: (plant it in a copy of the checkpoint, what the one error line says)
    ".metadata: bytes entry with a tensor's fields for an adapter key": (
        _bytes_entry_gadget,
        f"entry {LORA_A}: a BytesStorageMetadata with attributes it does not have (chunks, properties, size)",
    ),
    ".metadata: bytes entry for an adapter key": (
        lambda it, m: _bytes_entry_gadget(it, m, copy_fields=False),
        f"refused, adapter tensor {LORA_A} is declared as pickled bytes (BytesStorageMetadata)",
    ),
    ".metadata: os.mkdir reduce": (
        lambda it, m: (it / ".metadata").write_bytes(pickle.dumps(_Exploit(m))),
        "refused, it needs unsafe unpickling (posix.mkdir is not allowed in checkpoint metadata)",
    ),
    ".metadata: an unknown class": (
        lambda it, m: (it / ".metadata").write_bytes(pickle.dumps(shutil.Error("x"))),
        "refused, it needs unsafe unpickling (shutil.Error is not allowed in checkpoint metadata)",
    ),
    ".metadata: a metadata class with an extra attribute": (
        _extra_attribute,
        "a TensorStorageMetadata with attributes it does not have (evil)",
    ),
    ".distcp: a torch.save payload as an adapter item": (_distcp_gadget, "data.pkl names posix.mkdir"),
    "common.pt": (
        lambda it, m: _torch_save({"args": _Exploit(m)}, it / "common.pt"),
        "common.pt: refused, it needs unsafe unpickling (posix.mkdir is not loaded",
    ),
    "modelopt_state/common.pt": (
        lambda it, m: _torch_save(
            {"modelopt_state_dict": [("peft", {"config": _Exploit(m)})]}, it / "modelopt_state" / "common.pt"
        ),
        "modelopt_state/common.pt: refused, it needs unsafe unpickling (posix.mkdir is not loaded",
    ),
}


@pytest.mark.parametrize("case", sorted(GADGETS))
def test_a_payload_in_any_checkpoint_file_never_runs(world, tmp_path, case):
    iteration = _checkpoint(world, tmp_path)
    marker = tmp_path / "pwned"
    GADGETS[case][0](iteration, marker)
    _refused(tmp_path, _export(tmp_path, iteration), GADGETS[case][1], tmp_path / "save", marker)


def test_a_payload_in_a_legacy_rank_file_never_runs(tmp_path):
    iteration = tmp_path / "save" / ITER
    marker = tmp_path / "pwned"
    _torch_save({"model": {LORA_A: _Exploit(marker)}, "args": None}, iteration / "mp_rank_00" / "model_optim_rng.pt")
    _refused(
        tmp_path,
        _export(tmp_path, iteration),
        "model_optim_rng.pt: refused, it needs unsafe unpickling (posix.mkdir is not loaded",
        tmp_path / "save",
        marker,
    )


def test_a_payload_as_the_verification_reference_never_runs(world, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(world / "verified" / "save" / "iter_0000001" / "hf_adapter", adapter)
    marker = tmp_path / "pwned"
    _torch_save({"logits": _Exploit(marker)}, adapter / "verification" / "reference.safetensors")
    _refused(
        tmp_path,
        ["verify", str(adapter), "--base-model", str(world / "verified" / "base")],
        "reference.safetensors: not a valid safetensors file",
        adapter,
        marker,
    )


def test_a_payload_in_an_adapter_bin_never_runs(tmp_path):
    from megatron_peft_export.errors import AdapterFileError
    from megatron_peft_export.io.peft_dir import read_bin_header

    marker = tmp_path / "pwned"
    _torch_save({"base_model.model.x.lora_A.weight": _Exploit(marker)}, tmp_path / "adapter_model.bin")
    with pytest.raises(
        AdapterFileError, match=r"adapter_model.bin: refused, it needs unsafe unpickling \(posix.mkdir is not loaded"
    ):
        read_bin_header(tmp_path / "adapter_model.bin")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------- FIFOs


def _fifo(path: Path) -> None:
    if path.exists():
        path.unlink()
    os.mkfifo(path)


def test_a_fifo_in_place_of_a_checkpoint_file_does_not_block_export(world, tmp_path):
    iteration = _checkpoint(world, tmp_path)
    _fifo(iteration / "__0_0.distcp")
    _refused(
        tmp_path,
        _export(tmp_path, iteration),
        "__0_0.distcp: expected a .distcp data file, found a FIFO",
        tmp_path / "save",
    )
    _fifo(tmp_path / "save" / "latest_checkpointed_iteration.txt")
    _refused(
        tmp_path,
        _export(tmp_path, tmp_path / "save"),
        "latest_checkpointed_iteration.txt: expected Megatron's tracker file (an iteration number), found a FIFO",
        tmp_path / "save",
    )


def test_a_fifo_as_the_base_models_config_does_not_block_export_or_verify(world, tmp_path):
    iteration = _checkpoint(world, tmp_path)
    base = tmp_path / "base"
    shutil.copytree(world / "verified" / "base", base)
    _fifo(base / "config.json")
    _refused(
        tmp_path,
        [*_export(tmp_path, iteration), "--base-model", str(base)],
        "config.json: expected the base model's HF config.json, found a FIFO",
        tmp_path / "save",
    )
    adapter = world / "verified" / "save" / "iter_0000001" / "hf_adapter"
    _refused(
        tmp_path,
        ["verify", str(adapter), "--base-model", str(base), "--output", str(tmp_path / "out")],
        "config.json: expected a regular file of the base model, found a FIFO",
        adapter,
    )


@pytest.mark.parametrize(
    "fifo", ["adapter_config.json", "adapter_model.safetensors", "verification/reference.safetensors", "--reference"]
)
def test_a_fifo_in_an_adapter_does_not_block_verify(world, tmp_path, fifo):
    adapter = tmp_path / "adapter"
    shutil.copytree(world / "verified" / "save" / "iter_0000001" / "hf_adapter", adapter)
    argv = ["verify", str(adapter), "--base-model", str(world / "verified" / "base"), "--output", str(tmp_path / "out")]
    if fifo == "--reference":
        os.mkfifo(tmp_path / "reference")
        argv += ["--reference", str(tmp_path / "reference")]
        fifo = "reference"
    else:
        _fifo(adapter / fifo)
    assert "found a FIFO" in _refused(tmp_path, argv, f"{Path(fifo).name}: expected ", adapter)


def _import_from(rank, world_size, adapter, base):
    from megatron_peft_export import ExportError, load_hf_adapter
    from tests.support.tiny_gpt import TinyGPTConfig, apply_modelopt_lora, build_gpt, init_parallel

    init_parallel(1)
    model = apply_modelopt_lora(build_gpt(TinyGPTConfig()), scale=1.5)
    try:
        load_hf_adapter(model, adapter, base_model_name_or_path=base)
    except ExportError as exc:
        return f"{type(exc).__name__}: {exc}"
    return "loaded"


def test_a_fifo_does_not_block_import(world, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(world / "ckpt" / "live", adapter)
    base = tmp_path / "base"
    base.mkdir()
    _fifo(base / "config.json")
    found = run_ranks(_import_from, 1, str(adapter), str(base), timeout=HANG_S)[0]
    assert (
        found.startswith("ExportError: ")
        and "config.json: expected the base model's HF config.json, found a FIFO" in found
    ), found
    _fifo(adapter / "adapter_config.json")
    found = run_ranks(_import_from, 1, str(adapter), None, timeout=HANG_S)[0]
    assert (
        found.startswith("AdapterFileError: ")
        and "adapter_config.json: expected an adapter config (adapter_config.json), found a FIFO" in found
    ), found


def test_the_hooks_tracker_reads_do_not_block_on_a_fifo_or_follow_a_link_out(tmp_path):
    from megatron_peft_export.io.checkpoints import TRACKER, tracker_iteration

    (tmp_path / "secret").write_text("123")
    save = tmp_path / "save"
    save.mkdir()
    (save / TRACKER).symlink_to(tmp_path / "secret")
    assert tracker_iteration(save) is None
    _fifo(save / TRACKER)
    assert run_alone(tracker_iteration, save, timeout=HANG_S) is None
    _fifo(save / TRACKER)
    (save / TRACKER).unlink()
    (save / TRACKER).write_text("42\n")
    assert tracker_iteration(save) == 42


def test_a_link_leaving_the_checkpoint_is_not_followed(world, tmp_path):
    iteration = _checkpoint(world, tmp_path)
    (tmp_path / "elsewhere.distcp").write_bytes((iteration / "__0_0.distcp").read_bytes())
    (iteration / "__0_0.distcp").unlink()
    (iteration / "__0_0.distcp").symlink_to(tmp_path / "elsewhere.distcp")
    _refused(
        tmp_path,
        _export(tmp_path, iteration),
        f"__0_0.distcp: a symbolic link to {tmp_path / 'elsewhere.distcp'}, outside",
        tmp_path / "save",
    )


# ---------------------------------------------------------------------------------------------- memory bombs


def _cli_limited(argv, limit):
    """The CLI in a forked process whose address space may grow by at most `limit` bytes past what it has mapped."""

    def run(argv, limit):
        import contextlib
        import io
        import resource

        from megatron_peft_export.cli import main

        mapped = next(
            int(line.split()[1]) * 1024
            for line in Path("/proc/self/status").read_text().splitlines()
            if line.startswith("VmSize:")
        )
        resource.setrlimit(resource.RLIMIT_AS, (mapped + limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            status = main([*argv, "--quiet"])
        return status, err.getvalue()

    return run_alone(run, argv, limit, timeout=HANG_S)


GiB = 1 << 30
LIMIT = 2 * GiB


def _claim_size(nbytes):
    def edit(metadata):
        tensor = metadata.state_dict_metadata[LORA_A]
        rows = nbytes // (4 * tensor.size[1])
        tensor.size = type(tensor.size)([rows, tensor.size[1]])
        tensor.chunks[0].sizes = tensor.size

    return edit


def _claim_length(nbytes):
    def edit(metadata):
        next(v for k, v in metadata.storage_data.items() if k.fqn == LORA_A).length = nbytes

    return edit


@pytest.mark.parametrize("claim", [12 * GiB, 100 * GiB], ids=["12GiB", "100GiB"])
@pytest.mark.parametrize(
    "what,edit,fragment",
    [
        ("tensor size", _claim_size, "claims {} bytes of torch.float32 data in a stored item of"),
        ("item length", _claim_length, "but the file has"),
    ],
)
def test_lengths_claimed_in_metadata_are_checked_before_allocating(world, tmp_path, claim, what, edit, fragment):
    iteration = _checkpoint(world, tmp_path)
    _edit_metadata(iteration, edit(claim))
    _refused(
        tmp_path,
        _export(tmp_path, iteration),
        fragment.format(claim // (4 * 64) * 4 * 64),
        tmp_path / "save",
        memory_limit=LIMIT,
    )


def test_a_pickle_memo_index_cannot_make_the_unpickler_allocate(world, tmp_path):
    """LONG_BINPUT 0x7fffffff makes CPython's unpickler zero-fill a 32 GiB memo table."""
    iteration = _checkpoint(world, tmp_path)
    (iteration / ".metadata").write_bytes(b"\x80\x02]r\xff\xff\xff\x7f.")
    _refused(
        tmp_path,
        _export(tmp_path, iteration),
        "a memo index past the pickle's size",
        tmp_path / "save",
        memory_limit=LIMIT,
    )


def test_a_legacy_storage_claiming_100_gib_is_refused_before_allocating(tmp_path):
    """A rank file whose data.pkl says a storage holds 100 GiB while its zip member holds 64 bytes."""
    _write_legacy_with_storage(tmp_path / "save" / ITER / "mp_rank_00" / "model_optim_rng.pt", numel=100 * GiB // 4)
    _refused(
        tmp_path,
        _export(tmp_path, tmp_path / "save" / ITER),
        "storage '0' of 107374182400 bytes is a member of 64 bytes",
        tmp_path / "save",
        memory_limit=LIMIT,
    )


def _write_legacy_with_storage(path: Path, numel: int) -> None:
    """A torch.save-format zip written by hand: model[LORA_A] is a float32 tensor over storage '0' that claims
    `numel`."""
    import collections
    import io
    import zipfile

    import torch

    class Storage:
        pass

    class Tensor:
        def __reduce__(self):
            return (torch._utils._rebuild_tensor_v2, (storage, 0, (8, 64), (64, 1), False, collections.OrderedDict()))

    storage = Storage()

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", numel) if obj is storage else None

    data = io.BytesIO()
    Pickler(data, protocol=2).dump({"model": {LORA_A: Tensor()}})
    path.parent.mkdir(parents=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", data.getvalue())
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/data/0", b"\0" * 64)


# ------------------------------------------------------------------------------ malformed values, once tracebacks


def _one_dimensional_lora_a(metadata):
    tensor = metadata.state_dict_metadata[LORA_A]
    tensor.size = type(tensor.size)([tensor.size[0] * tensor.size[1]])
    tensor.chunks[0].offsets, tensor.chunks[0].sizes = type(tensor.size)([0]), tensor.size


def _no_properties(metadata):
    metadata.state_dict_metadata[LORA_A].properties = None


@pytest.mark.parametrize(
    "edit,fragment",
    [
        (_one_dimensional_lora_a, f"{LORA_A} has shape [512]; expected 2 dimensions"),
        (_no_properties, f"tensor {LORA_A}: properties: expected TensorProperties, found NoneType"),
    ],
    ids=["1-D lora_a", "properties None"],
)
def test_malformed_metadata_values_are_one_error_line(world, tmp_path, edit, fragment):
    iteration = _checkpoint(world, tmp_path)
    _edit_metadata(iteration, edit)
    _refused(tmp_path, _export(tmp_path, iteration), fragment, tmp_path / "save")


def _rewrite_reference(path, edit):
    """Load the reference, edit its tensors and metadata, save it back (in a forked process: torch work)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    edit(tensors, metadata)
    save_file(tensors, path, metadata=metadata)


def _non_integer_iteration(tensors, metadata):
    metadata["iteration"] = "12abc"


def _empty_probe(tensors, metadata):
    tensors["input_ids"] = tensors["input_ids"][:, :0].contiguous()
    tensors["logits"] = tensors["logits"][:, :0].contiguous()
    for key in [k for k in tensors if k.startswith("blocks.")]:
        tensors[key] = tensors[key][:, :0].contiguous()


@pytest.mark.parametrize(
    "edit,fragment",
    [
        (_non_integer_iteration, "metadata iteration is '12abc'; expected a non-negative integer"),
        (_empty_probe, "the probe is empty"),
    ],
    ids=["non-integer iteration", "empty probe"],
)
def test_a_malformed_reference_is_one_error_line(world, tmp_path, edit, fragment):
    adapter = tmp_path / "adapter"
    shutil.copytree(world / "verified" / "save" / "iter_0000001" / "hf_adapter", adapter)
    run_alone(_rewrite_reference, str(adapter / "verification" / "reference.safetensors"), edit)
    _refused(
        tmp_path,
        ["verify", str(adapter), "--base-model", str(world / "verified" / "base"), "--output", str(tmp_path / "out")],
        fragment,
        adapter,
    )


# ------------------------------------------------------- pickles that attack the unpickler's resources, not code
# Each once crashed (SIGSEGV), hung or imported code; the bytes are in tests/support/hostile_pickles.py.


def _metadata_bytes(data: bytes):
    return lambda iteration: (iteration / ".metadata").write_bytes(data)


def _metadata_edit(edit):
    return lambda iteration: _edit_metadata(iteration, edit)


def _common_pt(data_pkl: bytes):
    return lambda iteration: (iteration / "common.pt").write_bytes(hp.with_data_pkl(data_pkl))


def _size(value):
    def edit(metadata):
        metadata.state_dict_metadata[LORA_A].size = value

    return edit


def _bomb_storage_key(iteration: Path) -> None:
    """A .distcp item whose data.pkl names its storage by a list of shared lists (str() of it never ends)."""
    import torch

    class Tensor:
        def __reduce__(self):
            return (torch._utils._rebuild_tensor_v2, (storage, 0, (4,), (1,), False, {}))

    storage = object()

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, hp.shared_lists(), "cpu", 4) if obj is storage else None

    data = io.BytesIO()
    Pickler(data, protocol=2).dump(Tensor())
    blob = hp.with_data_pkl(data.getvalue(), storages={"0": b"\0" * 16, "padding": b"\0" * 4096})  # item's size
    offset = _append(iteration / "__0_0.distcp", blob)

    def edit(metadata):
        info = next(v for k, v in metadata.storage_data.items() if k.fqn == LORA_A)
        info.relative_path, info.offset, info.length = "__0_0.distcp", offset, len(blob)

    _edit_metadata(iteration, edit)


def _encrypted(data: bytes) -> bytes:
    """The zip with every member flagged as encrypted (general purpose bit 0, local and central headers)."""
    data = bytearray(data)
    for signature, at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        start = data.find(signature)
        while start >= 0:
            data[start + at] |= 1
            start = data.find(signature, start + 4)
    return bytes(data)


def _yaml_laughs() -> str:
    """Nine levels of ten aliases of the level below: 400 bytes of YAML, 10^9 items to anything that walks it."""
    levels = ["l0: &l0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    levels += [f"l{n}: &l{n} [{', '.join([f'*l{n - 1}'] * 10)}]" for n in range(1, 9)]
    return "\n".join([*levels, "model: {num_layers: *l8, hidden_size: *l8}"]) + "\n"


RESOURCE_ATTACKS = {  # case: (plant it in a copy of the checkpoint, what the one error line says)
    ".metadata: shared lists as a tensor's size (a repr that never ends)": (
        _metadata_edit(_size(hp.shared_lists())),
        f"tensor {LORA_A}: size: expected up to 64 integers from 0 to 281474976710656, found [[[<list of 32>",
    ),
    ".metadata: a shared-tuple dict key (hashing never ends)": (
        _metadata_bytes(hp.tuple_bomb_key()),
        "a tuple of shared tuples holding more items than the pickle has bytes",
    ),
    ".metadata: a dict key nested 200000 tuples deep (SIGSEGV)": (
        _metadata_bytes(hp.deep_tuple_key()),
        "a tuple nested 101 deep (at most 100)",
    ),
    ".metadata: a huge integer as a tensor's size": (
        _metadata_edit(_size([1 << 40000, 4])),
        "found [<an integer of 40001 bits>, 4]",
    ),
    ".distcp: shared lists as a storage key": (
        _bomb_storage_key,
        "unexpected storage reference ('storage', <dtype>, [[<list of 32>",
    ),
    "common.pt: shared lists in the args (every walk of them never ends)": (
        _common_pt(hp.in_a_dict("args", hp.opcodes(hp.shared_lists()))),
        "items counted through shared references",
    ),
    "common.pt: a shared-tuple dict key": (_common_pt(hp.tuple_bomb_key()), "a tuple of shared tuples"),
    "common.pt: a dict key nested 200000 tuples deep": (_common_pt(hp.deep_tuple_key()), "a tuple nested 101 deep"),
    "common.pt: an integer of 40000 bits (str() refuses it)": (
        _common_pt(hp.in_a_dict("args", hp.huge_int())),
        "an integer of 40001 bits (at most 1024)",
    ),
    "common.pt: 5000 distinct class names (a class object each)": (
        _common_pt(hp.many_classes(5000)),
        "more than 1024 class names",
    ),
    "run_config.yaml: aliases of aliases (10^9 items to walk)": (
        lambda it: (it / "run_config.yaml").write_text(_yaml_laughs()),
        "run_config.yaml: not readable YAML (more than",
    ),
    "common.pt: an encrypted member": (
        lambda it: (it / "common.pt").write_bytes(_encrypted(hp.with_data_pkl(pickle.dumps({"args": None})))),
        "common.pt: cannot be read (ValueError: zip member archive/data.pkl is encrypted)",
    ),
}


@pytest.mark.parametrize("case", sorted(RESOURCE_ATTACKS))
def test_a_pickle_attacking_the_unpickler_is_refused_in_one_line(world, tmp_path, case):
    iteration = _checkpoint(world, tmp_path)
    plant, fragment = RESOURCE_ATTACKS[case]
    plant(iteration)
    _refused(tmp_path, _export(tmp_path, iteration), fragment, tmp_path / "save", memory_limit=LIMIT)


def test_bytearray_of_a_number_is_refused_before_allocating(tmp_path):
    """bytearray(8 GiB) as a legacy rank file's value: zero-filled memory for 60 bytes of pickle."""
    iteration = tmp_path / "save" / ITER
    (iteration / "mp_rank_00").mkdir(parents=True)
    eight_gib = b"\x8a\x05" + (8 * GiB).to_bytes(5, "little")  # LONG1
    data_pkl = hp.in_a_dict("model", b"c__builtin__\nbytearray\n" + eight_gib + b"\x85R")
    (iteration / "mp_rank_00" / "model_optim_rng.pt").write_bytes(hp.with_data_pkl(data_pkl))
    _refused(
        tmp_path,
        _export(tmp_path, iteration),
        "bytearray of int; expected the bytes it holds",
        tmp_path / "save",
        memory_limit=LIMIT,
    )


def _export_recording_torch_lookups(argv):
    """The CLI with torch's module __getattr__ (which imports torch._dynamo, _inductor, onnx and calls
    torch.backends.*.is_built for the names it knows) recording the names it is asked for."""
    import contextlib

    import torch

    from megatron_peft_export.cli import main

    asked, original = [], torch.__dict__["__getattr__"]

    def recording(name):
        asked.append(name)
        return original(name)

    torch.__getattr__ = recording
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = main([*argv, "--quiet"])
    return status, err.getvalue(), asked


@pytest.mark.parametrize("where", [".metadata", "common.pt"])
def test_a_torch_name_in_a_pickle_never_reaches_torchs_lazy_lookup(world, tmp_path, where):
    iteration = _checkpoint(world, tmp_path)
    data = hp.global_pickle("torch", "has_mps")
    (iteration / where).write_bytes(data if where == ".metadata" else hp.with_data_pkl(data))
    status, err, asked = run_alone(_export_recording_torch_lookups, _export(tmp_path, iteration), timeout=HANG_S)
    assert status == 2 and "torch.has_mps" in err and len(err.strip().splitlines()) == 1, err
    assert "has_mps" not in asked, "reading the pickle called torch's module __getattr__"


def test_a_tracker_number_too_long_for_a_directory_name_is_one_line(tmp_path):
    save = tmp_path / "save"
    save.mkdir()
    (save / "latest_checkpointed_iteration.txt").write_text("9" * 1000)
    line = _refused(tmp_path, _export(tmp_path, save), "(1000 characters; at most 18 digits)", save)
    assert len(line) < 400, line
