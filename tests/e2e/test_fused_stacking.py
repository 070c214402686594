"""The writer's fused expert tensors filled by stacking its whole expert shards into the file's payload
(`export._place`, one `torch.stack` per fused tensor), against the per-expert tensors the same model exports, fused
here by peft's layout (lora_A expert-major rows, lora_B rank-major columns), and against placing every shard's slices
one by one into the per-expert views of the fused tensors."""

import pytest

from tests.support.multiprocess import run_ranks

pytestmark = pytest.mark.timeout(300)


def _fused_reference(per_expert: dict, layers: int, experts: int) -> dict:
    """Mixtral's per-expert w1/w3 (gate, up) and w2 tensors fused as peft lays them out; other tensors as they are."""
    import torch

    out, fused = {}, set()
    for i in range(layers):
        moe, prefix = (
            f"base_model.model.model.layers.{i}.block_sparse_moe.experts",
            f"base_model.model.model.layers.{i}",
        )

        def key(e, w, role, moe=moe):
            name = f"{moe}.{e}.{w}.lora_{role}.weight"
            fused.add(name)
            return per_expert[name]

        gate_a = [key(e, "w1", "A") for e in range(experts)]
        assert all(torch.equal(a, key(e, "w3", "A")) for e, a in enumerate(gate_a))  # one lora_A for gate and up
        gate_up_b = [torch.cat([key(e, "w1", "B"), key(e, "w3", "B")]) for e in range(experts)]
        down_b = [key(e, "w2", "B") for e in range(experts)]
        rows, r = gate_up_b[0].shape
        out[f"{prefix}.mlp.experts.base_layer.lora_A.weight"] = torch.cat(gate_a)
        out[f"{prefix}.mlp.experts.base_layer.lora_B.weight"] = torch.stack(gate_up_b, 2).reshape(rows, r * experts)
        out[f"{prefix}.mlp.experts.lora_A.weight"] = torch.cat([key(e, "w2", "A") for e in range(experts)])
        out[f"{prefix}.mlp.experts.lora_B.weight"] = torch.stack(down_b, 2).reshape(down_b[0].shape[0], r * experts)
    out.update({k: v for k, v in per_expert.items() if k not in fused})
    return out


def _stacked_run(rank, world, tmp):
    from pathlib import Path

    import torch
    from safetensors.torch import load_file

    from megatron_peft_export import distributed as coll
    from megatron_peft_export import export as ex
    from megatron_peft_export import export_adapter
    from megatron_peft_export.core.plan import apply_placements
    from megatron_peft_export.host_snapshot import live_snapshots
    from tests.support import tiny_moe
    from tests.support.tiny_gpt import apply_modelopt_lora

    cfg = tiny_moe.MIXTRAL_LIKE
    results = {}
    for targets, dtype in (
        (tiny_moe.EXPERT_LORA_TARGETS, None),
        (tiny_moe.EXPERT_LORA_TARGETS, "bfloat16"),  # the stacked shards converted as every copy converts
        (tiny_moe.ROUTED_EXPERT_TARGETS, None),  # every placement stacked: nothing else to copy
    ):
        tiny_moe.init_moe_parallel()
        model = apply_modelopt_lora(tiny_moe.build_moe_gpt(cfg), targets=targets)
        tiny_moe.fill_moe_lora_random(model, seed=41)
        label = f"{len(targets)} {dtype}"
        files = {}
        for layout in ("per_expert", "fused", "fused"):  # the second fused export reuses the walk and the plan
            out = Path(tmp) / f"{layout}_{label}"
            export_adapter(model, out, model_type="mixtral", expert_layout=layout, dtype=dtype, overwrite=True)
            files[layout] = load_file(out / "adapter_model.safetensors")
        reference = _fused_reference(files["per_expert"], cfg.num_layers, cfg.num_experts)
        results[f"file {label}"] = sorted(reference) == sorted(files["fused"]) and all(
            torch.equal(reference[k], files["fused"][k]) for k in reference
        )

        options = ex.ExportOptions(model_type="mixtral", expert_layout="fused", dtype=dtype)
        snapshot = live_snapshots(model, coll.RankLayout.from_megatron(), options).first
        planned = ex._planned([snapshot.report], options, None)
        positions = list(range(len(planned.ordered)))
        out_dtype = getattr(torch, dtype) if dtype else None
        fast, simple = (ex.allocate_adapter(planned, options, out_dtype) for _ in range(2))
        for t in (*fast.written.values(), *simple.written.values()):
            t.fill_(-7.0)
        shards = [snapshot.shards[planned.ordered[n][1]].tensor for n in positions]
        ex._place(shards, planned, (0, None), positions, fast)
        assert fast._targets is None  # no per-expert view was made: every fused tensor was stacked
        for n in positions:
            shard = snapshot.shards[planned.ordered[n][1]].tensor.detach()
            apply_placements(simple.targets, planned.plan.placements[n], shard)
        stacks = planned.own[((0, None), True)][0]
        results[f"stacked {label}"] = (
            sorted(key for key, *_ in stacks) == sorted(fast.layout.experts)
            and all(torch.equal(fast.written[k], simple.written[k]) for k in simple.written)
            and all(fast.written[k].dtype == (out_dtype or torch.float32) for k in fast.written)
        )
    return results


def test_the_fused_layout_is_the_per_expert_tensors_stacked(tmp_path):
    """At EP=1 the writer holds every expert: each fused tensor is one stack of its shards, which gives the bytes of
    the per-expert export fused by peft's layout (also converted to bfloat16), and what placing each shard's slices
    into per-expert views gives; with other adapted modules (copied as before) or none."""
    (results,) = run_ranks(_stacked_run, 1, str(tmp_path))
    assert results == {key: True for key in results} and len(results) == 6, results


def _runs_run(rank, world):
    import torch

    from megatron_peft_export import distributed as coll
    from megatron_peft_export import export as ex
    from megatron_peft_export.core.plan import apply_placements
    from megatron_peft_export.host_snapshot import live_snapshots
    from tests.support import tiny_moe
    from tests.support.tiny_gpt import apply_modelopt_lora

    tiny_moe.init_moe_parallel()
    model = apply_modelopt_lora(tiny_moe.build_moe_gpt(tiny_moe.MIXTRAL_LIKE), targets=tiny_moe.EXPERT_LORA_TARGETS)
    tiny_moe.fill_moe_lora_random(model, seed=43)
    results = {}
    for dtype in (None, "bfloat16"):
        options = ex.ExportOptions(model_type="mixtral", expert_layout="per_expert", dtype=dtype)
        snapshot = live_snapshots(model, coll.RankLayout.from_megatron(), options).first
        planned = ex._planned([snapshot.report], options, None)
        positions = list(range(len(planned.ordered)))
        out_dtype = getattr(torch, dtype) if dtype else None
        fast, simple = (ex.allocate_adapter(planned, options, out_dtype) for _ in range(2))
        fast.written.flat.fill_(255)  # every byte is written: none keeps this
        simple.written.flat.fill_(255)
        shards = [snapshot.shards[planned.ordered[n][1]].tensor for n in positions]
        ex._place(shards, planned, (0, None), positions, fast)
        for n in positions:
            shard = snapshot.shards[planned.ordered[n][1]].tensor.detach()
            apply_placements(simple.targets, planned.plan.placements[n], shard)
        runs = planned.runs[((0, None), False, out_dtype)][0]
        results[dtype] = (
            sum(len(whole or members) for *_, whole, members in runs),
            torch.equal(fast.written.flat, simple.written.flat),
        )
    return results, len(planned.ordered)


def test_small_tensors_lying_back_to_back_are_copied_a_run_at_a_time():
    """Per expert: small HF tensors that lie back to back in the payload, each filled whole by a shard or rows of one,
    are copied a run at a time from those flattened; the payload's bytes equal placing every shard's slices one by
    one (also converted to bfloat16)."""
    (results,) = run_ranks(_runs_run, 1)
    results, shards = results
    for dtype, (in_runs, same) in results.items():
        assert same, dtype
        assert in_runs > shards, (dtype, in_runs, shards)  # gate and up: two tensors of each fc1 shard
