"""Bad and hostile input across the CLI (export, verify, push) and the import path: each is refused with exit
status 2 and one `error:` line (an ExportError from load_hf_adapter, before any parameter is written), and
nothing is written. Checkpoint files are loaded safely only: a pickle that would run code is refused, unrun."""

import hashlib
import json
import re
import shutil
import struct
from pathlib import Path

import pytest

from megatron_peft_export.cli import main
from tests.e2e.test_offline_export import ITERATION, _offline, _train_save_and_export_live
from tests.support.checkpoint_args import recorded_args
from tests.support.multiprocess import run_ranks

pytestmark = pytest.mark.timeout(300)
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
CLOSED = "http://127.0.0.1:9"  # push never gets as far as the network with bad input; if it did, nothing listens here


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A good adapter (live/) and the torch_dist checkpoint it came from (save/), of the tiny model with ModelOpt
    LoRA."""
    tmp = tmp_path_factory.mktemp("exported")
    run_ranks(_train_save_and_export_live, 1, str(tmp), 1, 1, "modelopt")
    return tmp


def _edit_config(edit):
    def apply(adapter: Path):
        config = json.loads((adapter / CONFIG).read_text())
        edit(config)
        (adapter / CONFIG).write_text(json.dumps(config))

    return apply


def _edit_header(edit):
    """Rewrite the safetensors header (a JSON object after its 8-byte length) and keep the data as is."""

    def apply(adapter: Path):
        raw = (adapter / WEIGHTS).read_bytes()
        (length,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + length])
        edit(header)
        data = json.dumps(header).encode()
        (adapter / WEIGHTS).write_bytes(struct.pack("<Q", len(data)) + data + raw[8 + length :])

    return apply


def _edit_tensors(edit):
    def apply(adapter: Path):
        from safetensors.torch import load_file, save_file

        tensors = load_file(adapter / WEIGHTS)
        edit(tensors, sorted(tensors))
        save_file(tensors, str(adapter / WEIGHTS), metadata={"format": "pt"})

    return apply


def _first_offsets_past_the_end(header):
    key = sorted(k for k in header if k != "__metadata__")[0]
    header[key]["data_offsets"][1] += 64


def _poison(value):
    def edit(tensors, keys):
        tensors[keys[3]][0, 1] = value

    return edit


BAD_ADAPTERS = {  # case: (how to break a good adapter, what the one error line says)
    "config not JSON": (lambda a: (a / CONFIG).write_text("{'r': 8,"), "not a readable JSON adapter config"),
    "config not an object": (lambda a: (a / CONFIG).write_text("[1, 2]"), "expected a JSON object, found list"),
    "config nested 100000 deep": (lambda a: (a / CONFIG).write_text("[" * 100000 + "]" * 100000), "nested too deeply"),
    "config of 2 MiB": (
        _edit_config(lambda c: c.update(padding="x" * (2 << 20))),
        "expected an adapter config of at most 1048576 bytes",
    ),
    "config with a NaN literal": (
        lambda a: (a / CONFIG).write_text(
            re.sub(r'"lora_alpha": [0-9.]+', '"lora_alpha": NaN', (a / CONFIG).read_text())
        ),
        "NaN is not valid JSON",
    ),
    "r not an integer": (_edit_config(lambda c: c.update(r="8")), "r: expected an integer from 1 to"),
    "not a LoRA config": (_edit_config(lambda c: c.update(peft_type="PROMPT_TUNING")), 'peft_type: expected "LORA"'),
    "catastrophic regex": (_edit_config(lambda c: c.update(rank_pattern={"(a+)+$": 4})), "can backtrack exponentially"),
    "header offsets past the data": (_edit_header(_first_offsets_past_the_end), "not a valid safetensors file"),
    "header length past the file": (
        lambda a: (a / WEIGHTS).write_bytes(struct.pack("<Q", 1 << 40) + (a / WEIGHTS).read_bytes()[8:]),
        "not a valid safetensors file",
    ),
    "truncated weights": (
        lambda a: (a / WEIGHTS).write_bytes((a / WEIGHTS).read_bytes()[:-100]),
        "not a valid safetensors file",
    ),
    "integer tensors": (
        _edit_tensors(lambda t, keys: t.update({keys[0]: t[keys[0]].int()})),
        "expected floating-point adapter tensors",
    ),
    "shapes contradict r": (_edit_config(lambda c: c.update(r=16)), "shapes contradict adapter_config.json"),
    "NaN in a tensor": (_edit_tensors(_poison(float("nan"))), "hold NaN or Inf values"),
    "Inf in a tensor": (_edit_tensors(_poison(float("inf"))), "hold NaN or Inf values"),
    "no weights file": (lambda a: (a / WEIGHTS).unlink(), "missing; expected the adapter weights"),
}


def _bad_copy(exported: Path, into: Path, case: str) -> Path:
    adapter = into / case.replace(" ", "_")
    shutil.copytree(exported / "live", adapter)
    BAD_ADAPTERS[case][0](adapter)
    return adapter


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _one_error_line(err: str, fragment: str) -> None:
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert fragment in err, err


@pytest.mark.parametrize("command", ["verify", "push"])
@pytest.mark.parametrize("case", sorted(BAD_ADAPTERS))
def test_verify_and_push_refuse_a_bad_adapter_with_one_line_and_write_nothing(
    exported, tmp_path, capsys, command, case
):
    adapter = _bad_copy(exported, tmp_path, case)
    before = _tree(tmp_path)
    argv = {
        "verify": ["verify", str(adapter), "--base-model", str(tmp_path / "base")],
        "push": ["push", str(adapter), "--repo-id", "me/adapter", "--endpoint", CLOSED, "--retries", "0"],
    }[command]
    assert main(argv) == 2
    _one_error_line(capsys.readouterr().err, BAD_ADAPTERS[case][1])
    assert _tree(tmp_path) == before


def _import_each(rank, world, cases_dir, cases):
    import torch

    from megatron_peft_export import ExportError, load_hf_adapter
    from tests.support.tiny_gpt import TinyGPTConfig, apply_modelopt_lora, build_gpt, init_parallel

    init_parallel(1)
    model = apply_modelopt_lora(build_gpt(TinyGPTConfig()), scale=1.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora" in n}
    found = {}
    for case in cases:
        try:
            load_hf_adapter(model, Path(cases_dir) / case.replace(" ", "_"))
            found[case] = "loaded"
        except ExportError as exc:
            found[case] = f"{type(exc).__name__}: {exc}"
    unchanged = all(torch.equal(before[n], p) for n, p in model.named_parameters() if "lora" in n)
    return found, unchanged


@pytest.fixture(scope="module")
def imported(exported, tmp_path_factory):
    """load_hf_adapter of every bad adapter, into one model, in one rank; and whether the model's adapter stayed as it
    was."""
    cases_dir = tmp_path_factory.mktemp("bad_adapters")
    for case in BAD_ADAPTERS:
        _bad_copy(exported, cases_dir, case)
    before = _tree(cases_dir)
    (result,) = run_ranks(_import_each, 1, str(cases_dir), sorted(BAD_ADAPTERS))
    assert _tree(cases_dir) == before
    return result


@pytest.mark.parametrize("case", sorted(BAD_ADAPTERS))
def test_load_hf_adapter_refuses_a_bad_adapter_before_writing_any_parameter(imported, case):
    found, unchanged = imported
    assert found[case].split(":")[0] in ("AdapterFileError", "NonFiniteError"), found[case]
    assert BAD_ADAPTERS[case][1] in found[case], found[case]
    assert unchanged, "no adapter parameter may change when an import is refused"


def test_push_and_export_refuse_a_directory_name_that_leaves_the_iteration(exported, tmp_path, capsys):
    save = tmp_path / "save"
    shutil.copytree(exported / "save", save)
    before = _tree(tmp_path)
    assert main(["push", str(save), "--repo-id", "me/adapter", "--endpoint", CLOSED, "--dir-name", "../escape"]) == 2
    _one_error_line(capsys.readouterr().err, "--dir-name: expected a plain directory name")
    status, err, _ = run_ranks(_offline, 1, ["export", str(save), "--all", "--dir-name", "../../escape"])[0]
    assert status == 2
    _one_error_line(err[err.index("error: ") :], "--dir-name: expected a plain directory name")
    assert _tree(tmp_path) == before


class _Exploit:
    """Unpickling this runs os.mkdir(marker): what a hostile checkpoint would do with a plain pickle.load."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.mkdir, (self.marker,))


def _hostile_metadata(iteration: Path, marker: Path):
    import pickle

    (iteration / ".metadata").write_bytes(pickle.dumps(_Exploit(str(marker))))


def _metadata_outside(iteration: Path, marker: Path):
    """A well-formed .metadata whose first data file is ../../<something>: a read outside the checkpoint directory."""
    import pickle

    with open(iteration / ".metadata", "rb") as f:  # the test's own checkpoint: plain pickle is fine here
        metadata = pickle.load(f)
    first = next(iter(metadata.storage_data))
    metadata.storage_data[first].relative_path = "../../outside.distcp"
    (iteration / ".metadata").write_bytes(pickle.dumps(metadata))


def _save_legacy(rank, world, save, poison):
    """A Megatron-LM legacy checkpoint (mp_rank_00/model_optim_rng.pt) of the tiny model, one LoRA value set to
    `poison`."""

    import modelopt.torch.opt as mto
    import torch

    from tests.support.tiny_gpt import TinyGPTConfig, apply_modelopt_lora, build_gpt, fill_lora_random, init_parallel

    cfg = TinyGPTConfig()
    init_parallel(1)
    model = apply_modelopt_lora(build_gpt(cfg))
    fill_lora_random(model, seed=5)
    if poison is not None:
        with torch.no_grad():
            next(p for n, p in model.named_parameters() if "lora_b" in n)[0, 0] = poison
    args = recorded_args(
        cfg,
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
    )
    path = Path(save) / f"iter_{ITERATION:07d}" / "mp_rank_00" / "model_optim_rng.pt"
    path.parent.mkdir(parents=True)
    torch.save(
        {
            "model": model.state_dict(),
            "args": args,
            "iteration": ITERATION,
            "modelopt_state": mto.modelopt_state(model),
        },
        path,
    )


@pytest.mark.parametrize(
    "case,message",
    [
        (
            "hostile .metadata pickle",
            "refused, it needs unsafe unpickling (posix.mkdir is not allowed in checkpoint metadata)",
        ),
        (
            ".metadata naming a file outside",
            "refused, it names data files outside the checkpoint directory (../../outside.distcp, for ",
        ),
        ("hostile legacy pickle", "model_optim_rng.pt: refused, it needs unsafe unpickling (posix.mkdir is not loaded"),
        ("NaN in the checkpoint's adapter", "hold NaN or Inf values"),
    ],
)
def test_export_refuses_unsafe_or_nonfinite_checkpoints_with_one_line_and_writes_nothing(
    exported, tmp_path, case, message
):

    save, marker = tmp_path / "save", tmp_path / "pwned"
    if case.startswith(".metadata") or case.startswith("hostile ."):
        shutil.copytree(exported / "save", save)
        (_hostile_metadata if case.startswith("hostile") else _metadata_outside)(save / f"iter_{ITERATION:07d}", marker)
    else:
        run_ranks(_save_legacy, 1, str(save), float("nan") if case.startswith("NaN") else None)
        if case.startswith("hostile"):
            import torch

            torch.save(
                {"model": _Exploit(str(marker))}, save / f"iter_{ITERATION:07d}" / "mp_rank_00" / "model_optim_rng.pt"
            )
    argv = ["export", str(save / f"iter_{ITERATION:07d}"), "--output", str(tmp_path / "out")]
    status, err, _ = run_ranks(_offline, 1, argv)[0]
    assert status == 2
    _one_error_line(err[err.index("error: ") :], message)
    assert not marker.exists(), "the pickle's code must never run"
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    if case.startswith("NaN"):  # flagged by default; written on request
        status, err, _ = run_ranks(_offline, 1, [*argv, "--allow-nonfinite"])[0]
        assert status == 0 and (tmp_path / "out" / WEIGHTS).is_file(), err
