"""Offline export of checkpoints written by real dist_checkpointing.save: identical to the live export,
reads no base-weight bytes, and rejects bad input with exit status 2 and nothing written."""

import json
from pathlib import Path

import pytest
import yaml

from tests.support.checkpoint_args import recorded_args
from tests.support.multiprocess import run_ranks

pytestmark = pytest.mark.timeout(300)
ITERATION = 5


def _train_save_and_export_live(rank, world, tmp, tp, pp, variant, targets=None, live=True):
    """A model with random adapters: exported live (unless not `live`), and saved as a Megatron-LM / Bridge style
    torch_dist
    checkpoint (Bridge: its own PEFT modules, tests/support/real_bridge.py; base weights saved too, so that a read of
    them would show)."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from modelopt.torch.opt.plugins.mcore_dist_checkpointing import save_sharded_modelopt_state

    from megatron_peft_export import export_adapter
    from megatron_peft_export.io.checkpoints import TRACKER, iteration_dir
    from tests.support import real_bridge
    from tests.support.tiny_gpt import TinyGPTConfig, apply_modelopt_lora, build_gpt, fill_lora_random, init_parallel
    from tests.support.training import _in_process_write_results, _may_fork

    cfg = TinyGPTConfig()
    init_parallel(tp, pp)
    model = build_gpt(cfg)
    model = (
        apply_modelopt_lora(model, scale=1.5)
        if variant == "modelopt"
        else real_bridge.apply(model, variant, dim=8, alpha=12, target_modules=targets)
    )
    fill_lora_random(model, seed=17)
    if live:
        export_adapter(model, Path(tmp) / "live")
    directory = iteration_dir(Path(tmp) / "save", ITERATION)
    directory.mkdir(parents=True, exist_ok=True)
    state = {"model": model.sharded_state_dict(), "iteration": ITERATION}
    if variant == "modelopt":  # Megatron-LM records its args in common.pt
        state["args"] = recorded_args(
            cfg,
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
        )
    _in_process_write_results()
    with _may_fork():
        dist_checkpointing.save(state, str(directory))
        if variant == "modelopt":
            save_sharded_modelopt_state([model], str(directory))
    if rank == 0:
        if variant != "modelopt":  # Bridge records its config in run_config.yaml
            run_config = {
                "model": {
                    "num_layers": cfg.num_layers,
                    "hidden_size": cfg.hidden_size,
                    "num_attention_heads": cfg.num_attention_heads,
                    "num_query_groups": cfg.num_query_groups,
                    "kv_channels": cfg.kv_channels,
                    "ffn_hidden_size": cfg.ffn_hidden_size,
                    "gated_linear_unit": True,
                    "tensor_model_parallel_size": tp,
                },
                "peft": {"_target_": "megatron.bridge.peft.lora.LoRA", "dim": 8, "alpha": 12},
            }
            (directory / "run_config.yaml").write_text(yaml.safe_dump(run_config))
        (Path(tmp) / "save" / TRACKER).write_text(str(ITERATION))
    dist.barrier()


def _offline(rank, world, argv, warm_output=None):
    """The CLI in a fresh rank; returns its exit status, stderr and the bytes it read through system calls.

    The bytes are the process's `rchar` (/proc/self/io) across the call. With `warm_output`, the same checkpoint is
    exported there first, unmeasured, so module imports and other first-use reads are not counted.
    """
    import contextlib
    import io

    from megatron_peft_export.cli import main

    def rchar() -> int:
        return next(
            int(line.split()[1]) for line in Path("/proc/self/io").read_text().splitlines() if line.startswith("rchar:")
        )

    if warm_output is not None:
        with contextlib.redirect_stderr(io.StringIO()):
            main([argv[0], argv[1], "--output", warm_output, "--quiet"])
    err = io.StringIO()
    before = rchar()
    with contextlib.redirect_stderr(err):
        status = main([*argv, "--quiet"])
    return status, err.getvalue(), rchar() - before


def _corrupt_base_weights(iteration_dir: Path) -> tuple[int, int]:
    """Overwrite the stored bytes of every non-adapter tensor: a read of any of them would fail to unpickle."""
    from torch.distributed.checkpoint import FileSystemReader

    from megatron_peft_export.offline.keys import classify

    metadata = FileSystemReader(str(iteration_dir)).read_metadata()
    adapter = base = 0
    for index, info in metadata.storage_data.items():
        if classify(index.fqn) is not None:
            adapter += info.length
            continue
        base += info.length
        with open(iteration_dir / info.relative_path, "r+b") as f:
            f.seek(info.offset)
            f.write(b"\xff" * info.length)
    return adapter, base


def _same_adapter(a: Path, b: Path):
    from safetensors.torch import load_file

    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert x.keys() == y.keys()
    for k in x:
        assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape and (x[k] == y[k]).all(), k
    assert json.loads((a / "adapter_config.json").read_text()) == json.loads((b / "adapter_config.json").read_text())


@pytest.mark.family(
    "llama",
    path="offline",
    layout="ModelOpt TP1, TP2, PP2, TP2xPP2; Bridge LoRA, CanonicalLoRA, DoRA at TP2",
    check="logits",
)
@pytest.mark.parametrize(
    "variant,tp,pp",
    [
        ("modelopt", 1, 1),
        ("modelopt", 2, 1),
        ("modelopt", 1, 2),
        ("modelopt", 2, 2),
        ("lora", 2, 1),
        ("lora", 2, 2),
        ("canonical", 2, 1),
        ("dora", 2, 1),
        ("dora", 1, 1),
    ],
    ids=lambda v: str(v),
)
def test_offline_export_equals_live_export_and_reads_no_base_bytes(request, tmp_path, variant, tp, pp):
    """DoRA at TP2 on column-parallel linears (its fc1 magnitude is saved rank-interleaved); at TP1 on all four."""
    if variant != "modelopt":
        request.getfixturevalue("real_bridge")
    targets = ("linear_qkv", "linear_fc1") if variant == "dora" and tp > 1 else None
    run_ranks(_train_save_and_export_live, tp * pp, str(tmp_path), tp, pp, variant, targets)
    adapter_bytes, base_bytes = _corrupt_base_weights(tmp_path / "save" / f"iter_{ITERATION:07d}")
    iteration = tmp_path / "save" / f"iter_{ITERATION:07d}"
    status, err, read = run_ranks(
        _offline, 1, ["export", str(tmp_path / "save"), "--output", str(tmp_path / "offline")], str(tmp_path / "warm")
    )[0]
    assert status == 0, err
    _same_adapter(tmp_path / "live", tmp_path / "offline")
    # the adapter's bytes, plus at most the small files (.metadata, common.pt, modelopt_state) and 64 KiB;
    # never the base
    small_files = sum(f.stat().st_size for f in iteration.rglob("*") if f.is_file() and f.suffix != ".distcp")
    assert adapter_bytes <= read <= adapter_bytes + small_files + 2**16 < base_bytes, (
        read,
        adapter_bytes,
        small_files,
        base_bytes,
    )


def test_bridge_dora_saved_at_tp2_on_row_parallel_linears_is_refused_offline(real_bridge, tmp_path):
    """What the live export refuses (test_export_bridge.py) the checkpoint's export refuses too: exit 2, one line,
    nothing written."""
    run_ranks(_train_save_and_export_live, 2, str(tmp_path), 2, 1, "dora", None, False)
    status, err, _ = run_ranks(_offline, 1, ["export", str(tmp_path / "save"), "--output", str(tmp_path / "offline")])[
        0
    ]
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"error: {tmp_path / 'save' / 'iter_0000005'}: found Megatron-Bridge DoRA on row-parallel "
        "linears at tensor-parallel size 2: decoder.layers.{0..3}.mlp.linear_fc2, "
        "decoder.layers.{0..3}.self_attention.linear_proj. "
    ), err
    assert not (tmp_path / "offline").exists()


def test_backfill_writes_every_missing_iteration(tmp_path):
    run_ranks(_train_save_and_export_live, 2, str(tmp_path), 2, 1, "modelopt")
    save = tmp_path / "save"
    (save / "iter_0000009").mkdir()  # a second iteration: the same files under another name
    for f in (save / f"iter_{ITERATION:07d}").rglob("*"):
        target = save / "iter_0000009" / f.relative_to(save / f"iter_{ITERATION:07d}")
        target.parent.mkdir(parents=True, exist_ok=True)
        if f.is_file():
            target.write_bytes(f.read_bytes())
    status, err, _ = run_ranks(_offline, 1, ["export", str(save), "--all"])[0]
    assert status == 0, err
    for name in (f"iter_{ITERATION:07d}", "iter_0000009"):
        _same_adapter(tmp_path / "live", save / name / "hf_adapter")
    written = {f: f.stat().st_mtime_ns for f in save.rglob("hf_adapter/*")}
    status, err, _ = run_ranks(_offline, 1, ["export", str(save), "--all"])[0]
    assert status == 0, err
    assert {f: f.stat().st_mtime_ns for f in save.rglob("hf_adapter/*")} == written  # nothing left to do


def _bad(tmp: Path, case: str) -> Path:
    save = tmp / "save"
    iteration = save / f"iter_{ITERATION:07d}"
    if case == "not a checkpoint":
        (tmp / "empty").mkdir()
        return tmp / "empty"
    if case == "unknown format":
        (tmp / "odd").mkdir()
        (tmp / "odd" / "weights.bin").write_bytes(b"123")
        return tmp / "odd"
    if case == "truncated":
        victim = max(iteration.glob("*.distcp"), key=lambda p: p.stat().st_size)
        victim.write_bytes(victim.read_bytes()[:100])
    if case == "corrupt metadata":
        (iteration / ".metadata").write_bytes(b"not a pickle")
    if case == "unsafe pickle":  # torch.save of an object whose unpickling would call print
        import torch

        class Exploit:
            def __reduce__(self):
                return (print, ("pwned",))

        torch.save({"args": Exploit()}, iteration / "common.pt")
    return save


@pytest.mark.parametrize(
    "case,message",
    [
        ("not a checkpoint", "expected a Megatron checkpoint"),
        ("unknown format", "found ['weights.bin']"),
        ("truncated", "but the file has 100 bytes; is the file truncated"),
        ("corrupt metadata", ".metadata: cannot be read"),
        ("unsafe pickle", "common.pt: refused, it needs unsafe unpickling (builtins.print is not loaded"),
        ("other architecture", "num_query_groups: Megatron model has 4, the base model's config.json has 2"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, case, message):
    run_ranks(_train_save_and_export_live, 1, str(tmp_path), 1, 1, "modelopt")
    argv = ["export", str(_bad(tmp_path, case)), "--output", str(tmp_path / "out")]
    if case == "other architecture":
        base = tmp_path / "base"
        base.mkdir()
        (base / "config.json").write_text(
            json.dumps(
                {
                    "model_type": "llama",
                    "num_hidden_layers": 4,
                    "hidden_size": 64,
                    "num_attention_heads": 8,
                    "num_key_value_heads": 2,
                    "head_dim": 8,
                    "intermediate_size": 96,
                    "vocab_size": 128,
                }
            )
        )
        argv += ["--base-model", str(base)]
    status, err, _ = run_ranks(_offline, 1, argv)[0]
    assert status == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_checkpoint_without_adapters(tmp_path):
    def save_plain(rank, world, tmp):
        from megatron.core import dist_checkpointing

        from tests.support.tiny_gpt import TinyGPTConfig, build_gpt, init_parallel
        from tests.support.training import _in_process_write_results, _may_fork

        init_parallel()
        (Path(tmp) / "plain").mkdir()
        _in_process_write_results()
        with _may_fork():
            dist_checkpointing.save(
                {"model": build_gpt(TinyGPTConfig()).sharded_state_dict()}, str(Path(tmp) / "plain")
            )

    run_ranks(save_plain, 1, str(tmp_path))
    status, err, _ = run_ranks(_offline, 1, ["export", str(tmp_path / "plain"), "--output", str(tmp_path / "out")])[0]
    assert status == 2 and "no adapter tensors among its" in err and not (tmp_path / "out").exists()


def _save_legacy_and_export_live(rank, world, tmp, tp, pp):
    """Megatron-LM's legacy format: each (TP, PP) rank torch.saves its local state dict, args and ModelOpt state."""
    import modelopt.torch.opt as mto
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_peft_export import export_adapter
    from megatron_peft_export.io.checkpoints import iteration_dir
    from tests.support.tiny_gpt import TinyGPTConfig, apply_modelopt_lora, build_gpt, fill_lora_random, init_parallel

    cfg = TinyGPTConfig()
    init_parallel(tp, pp)
    model = apply_modelopt_lora(build_gpt(cfg), scale=0.5)
    fill_lora_random(model, seed=23)
    export_adapter(model, Path(tmp) / "live")
    name = f"mp_rank_{ps.get_tensor_model_parallel_rank():02d}" + (
        f"_{ps.get_pipeline_model_parallel_rank():03d}" if pp > 1 else ""
    )
    path = iteration_dir(Path(tmp) / "save", ITERATION) / name / "model_optim_rng.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    args = recorded_args(
        cfg,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
    )
    torch.save(
        {
            "model": model.state_dict(),
            "args": args,
            "iteration": ITERATION,
            "modelopt_state": mto.modelopt_state(model),
        },
        path,
    )
    dist.barrier()


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)], ids=["tp2", "pp2", "tp2xpp2"])
def test_legacy_format_equals_live_export(tmp_path, tp, pp):
    run_ranks(_save_legacy_and_export_live, tp * pp, str(tmp_path), tp, pp)
    status, err, _ = run_ranks(
        _offline, 1, ["export", str(tmp_path / "save" / f"iter_{ITERATION:07d}"), "--output", str(tmp_path / "offline")]
    )[0]
    assert status == 0, err
    _same_adapter(tmp_path / "live", tmp_path / "offline")


@pytest.mark.parametrize("variant", ["modelopt", "lora"])
def test_tp2_adapter_files_are_the_bytes_safetensors_writes_live_and_offline(request, tmp_path, variant):
    """The writer's file (header from the plan, payload by offset) is byte for byte what safetensors' own save_file
    writes for the same tensors (the independent reference), live and offline, and offline equals live."""
    from safetensors.torch import load_file, save_file

    if variant != "modelopt":
        request.getfixturevalue("real_bridge")
    run_ranks(_train_save_and_export_live, 2, str(tmp_path), 2, 1, variant, None)
    status, err, _ = run_ranks(
        _offline, 1, ["export", str(tmp_path / "save"), "--output", str(tmp_path / "offline")], str(tmp_path / "warm")
    )[0]
    assert status == 0, err
    files = [tmp_path / name / "adapter_model.safetensors" for name in ("live", "offline")]
    for path in files:
        save_file(load_file(path), str(tmp_path / "reference"), metadata={"format": "pt"})
        assert path.read_bytes() == (tmp_path / "reference").read_bytes(), path
    assert files[0].read_bytes() == files[1].read_bytes()
