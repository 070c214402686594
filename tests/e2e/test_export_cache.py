"""`export_adapter` and `export_adapters` reuse the model's walk and the writer's plan while the model is unchanged
(the hook's change check, host_snapshot.py), and walk and plan again after each change that can make them stale. Every
export is compared byte for byte with an export that walks and plans from scratch (`_uncached`), and each step counts
the walks and plans it made, so a stale walk or plan reused where it must not be fails here."""

import weakref
from pathlib import Path

import pytest

from tests.support.multiprocess import run_ranks

pytestmark = pytest.mark.timeout(300)


class _Counts:
    """Walks (each rank) and plans (the writer) made since the last `take`, by wrapping the two functions."""

    def __init__(self):
        from megatron_peft_export import export as ex
        from megatron_peft_export import host_snapshot as hs

        self.walks = self.plans = 0
        walk, plan = hs._walk_model, ex._plan

        def counted_walk(*args, **kwargs):
            self.walks += 1
            return walk(*args, **kwargs)

        def counted_plan(*args, **kwargs):
            self.plans += 1
            return plan(*args, **kwargs)

        hs._walk_model, ex._plan = counted_walk, counted_plan

    def take(self):
        made, self.walks, self.plans = (self.walks, self.plans), 0, 0
        return made


def _uncached(export, *args, **kwargs):
    """`export` (export_adapter or export_adapters) with a cache of walks of its own, dropped after: it walks and
    plans from scratch and leaves the cache as it was."""
    from megatron_peft_export import host_snapshot as hs

    kept, hs._LIVE = hs._LIVE, weakref.WeakKeyDictionary()
    try:
        return export(*args, **kwargs)
    finally:
        hs._LIVE = kept


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _compared(rank, out: Path, counts: _Counts, export, model, name: str, **kwargs) -> tuple[bytes | None, tuple]:
    """Export `name` cached, then from scratch; on the writer, assert the two directories are byte-identical. Returns
    the weights (writer) and the walks and plans of the cached export."""
    import torch.distributed as dist

    export(model, out / name, **kwargs)
    made = counts.take()
    _uncached(export, model, out / f"{name}_reference", **kwargs)
    counts.take()
    dist.barrier()
    if rank != 0:
        return None, made
    ours, reference = _files(out / name), _files(out / f"{name}_reference")
    assert ours.keys() == reference.keys() and all(ours[k] == reference[k] for k in ours), name
    return ours["adapter_model.safetensors"], made


def _new_data(param, tensor):
    """`param.data = tensor` (no module or parameter is registered: only the tensor check can notice)."""
    param.data = tensor


def _changes_run(rank, world, out):
    import torch
    from megatron.core.tensor_parallel.layers import copy_tensor_model_parallel_attributes

    from megatron_peft_export import export_adapter, export_adapters
    from tests.support.hook_loop import lora_model, optimizer_step
    from tests.support.tiny_gpt import apply_modelopt_lora, fill_lora_random

    out = Path(out)
    model = lora_model(world)
    counts = _Counts()
    made, weights = {}, {}
    layers = model.decoder.layers
    qkv, fc2 = layers[0].self_attention.linear_qkv, layers[1].mlp.linear_fc2

    def step(name, export=export_adapter, **kwargs):
        weights[name], made[name] = _compared(rank, out, counts, export, model, name, **kwargs)

    step("first")
    step("unchanged")
    optimizer_step(model, 1)  # new values, in place
    step("stepped")
    lora_b = qkv._lora_adapters["default"]["lora_b"]
    new = torch.nn.Parameter(lora_b.weight.detach().clone() + 0.5)
    copy_tensor_model_parallel_attributes(new, lora_b.weight)
    lora_b.weight = new  # a new Parameter (registered)
    step("replaced")
    _new_data(fc2.lora_a_default.weight, fc2.lora_a_default.weight.detach().clone() - 0.25)
    step("new_storage")
    _new_data(fc2.lora_b_default.weight, fc2.lora_b_default.weight.detach().to(torch.bfloat16))
    _new_data(fc2.lora_a_default.weight, fc2.lora_a_default.weight.detach().to(torch.bfloat16))
    step("new_dtype")
    generator = torch.Generator().manual_seed(3)  # the same on every rank: lora_a is not split here
    a, b = fc2.lora_a_default.weight, fc2.lora_b_default.weight
    _new_data(a, torch.randn((4, *a.shape[1:]), generator=generator, dtype=a.dtype))  # rank 8 -> 4
    _new_data(b, torch.randn((b.shape[0], 4), generator=generator, dtype=b.dtype))
    step("new_shape")
    fill_lora_random(apply_modelopt_lora(model, adapter_name="other", rank=4), seed=7)  # new modules
    step("other", adapter_name="other")
    step("all", export=export_adapters)
    step("all_again", export=export_adapters)
    step("default_again")
    step("bf16_output", dtype="bfloat16")  # the walk and the plan hold; the output dtype is not theirs
    return made, weights


def test_a_second_export_reuses_walk_and_plan_and_each_change_is_noticed(tmp_path):
    """Values changed in place: no walk, no plan, the new values written. A new Parameter, a `.data =` (new storage, a
    new dtype, a new rank), a new adapter: walked again; planned again when the plan would differ. Every export equals
    one made from scratch, byte for byte."""
    results = run_ranks(_changes_run, 2, str(tmp_path))
    (made, weights), (others, _) = results
    walks = {name: w for name, (w, _) in made.items()}
    assert walks == {name: w for name, (w, _) in others.items()}, "every rank walks at the same exports"
    expected_walks = {
        "first": 1,
        "unchanged": 0,
        "stepped": 0,
        "replaced": 1,
        "new_storage": 1,
        "new_dtype": 1,
        "new_shape": 1,
        "other": 1,
        "all": 1,
        "all_again": 0,
        "default_again": 1,  # its walk was made before "other" was added
        "bf16_output": 0,
    }
    assert walks == expected_walks
    plans = {name: p for name, (_, p) in made.items()}
    assert plans == {**expected_walks, "all": 2}, "a plan per walk (two adapters: two plans), none when cached"
    assert weights["unchanged"] == weights["first"] and weights["stepped"] != weights["first"], "values are read anew"
    assert len({weights[n] for n in ("stepped", "replaced", "new_storage", "new_dtype", "new_shape")}) == 5


def _options_run(rank, world, out):
    import dataclasses

    import torch.distributed as dist

    from megatron_peft_export import ExportError, ShapeMismatchError, export_adapter
    from megatron_peft_export import distributed as coll
    from megatron_peft_export import host_snapshot as hs
    from megatron_peft_export.export import ExportOptions
    from tests.support.hook_loop import lora_model
    from tests.support.tiny_gpt import TinyGPTConfig, hf_llama_twin

    out = Path(out)
    model = lora_model(world)
    counts = _Counts()
    base = out / "base"
    if rank == 0:
        base.mkdir()
        hf_llama_twin(TinyGPTConfig()).config.to_json_file(base / "config.json")
    dist.barrier()
    made = {}
    _, made["with_base"] = _compared(
        rank, out, counts, export_adapter, model, "with_base", base_model_name_or_path=str(base)
    )
    _, made["with_base_again"] = _compared(
        rank, out, counts, export_adapter, model, "with_base_again", base_model_name_or_path=str(base)
    )
    if rank == 0:  # the base model's config no longer fits the model: read again, planned again, refused
        config = (base / "config.json").read_text()
        (base / "config.json").write_text(config.replace('"hidden_size": ', '"hidden_size": 1'))
    dist.barrier()
    with pytest.raises(ShapeMismatchError, match="hidden_size"):
        export_adapter(model, out / "mismatch", base_model_name_or_path=str(base))
    made["mismatch"] = counts.take()
    _, made["llama_names"] = _compared(rank, out, counts, export_adapter, model, "llama_names", model_type="llama")
    _, made["qwen2_names"] = _compared(rank, out, counts, export_adapter, model, "qwen2_names", model_type="qwen2")

    with pytest.raises(ExportError, match="expected a megatron-core model"):  # nothing to cache a walk of
        export_adapter(object(), out / "not_a_model")
    counts.take()

    layout = coll.RankLayout.from_megatron()  # another parallel layout (as after a re-initialization): walked again
    options = ExportOptions()
    first = hs.live_snapshots(model, layout, options).first
    again = hs.live_snapshots(model, layout, options).first
    other = hs.live_snapshots(model, dataclasses.replace(layout, is_data_parallel_source=False), options).first
    made["layouts"] = counts.take()
    assert again.shards[0] is first.shards[0] and first.report.walk == again.report.walk
    assert first.shards and other.report.walk != first.report.walk and not other.shards, "no replica is exported"
    return made


def test_options_base_config_and_layout_are_part_of_what_is_reused(tmp_path):
    """The base model's config is read at every export (a config that stopped fitting is refused, however current
    the plan); another name map is planned again; another parallel layout is walked again."""
    results = run_ranks(_options_run, 2, str(tmp_path))
    for made in results:
        walks = {name: w for name, (w, _) in made.items()}
        assert walks == {
            "with_base": 1,
            "with_base_again": 0,
            "mismatch": 0,
            "llama_names": 0,
            "qwen2_names": 0,
            "layouts": 1,
        }
    plans = {name: p for name, (_, p) in results[0].items()}
    assert plans == {
        "with_base": 1,
        "with_base_again": 0,
        "mismatch": 1,
        "llama_names": 1,
        "qwen2_names": 1,
        "layouts": 0,
    }


def _one_rank_changes_run(rank, world, out):
    import torch.distributed as dist

    from megatron_peft_export import ExportError, export_adapter
    from tests.support.hook_loop import lora_model

    out = Path(out)
    model = lora_model(world)
    counts = _Counts()
    made = [_compared(rank, out, counts, export_adapter, model, "first")[1]]
    entry = model.decoder.layers[1].mlp.linear_fc1._lora_adapters["default"]
    if rank == 1:  # rank 1's half of one module's adapter goes; the writer's walk is still current
        entry["enable"] = False
    dist.barrier()
    with pytest.raises(ExportError, match="shards missing"):
        export_adapter(model, out / "half")
    made.append(counts.take())
    entry["enable"] = True
    made.append(_compared(rank, out, counts, export_adapter, model, "whole")[1])
    return made


def test_the_writer_plans_again_when_another_rank_walked_again(tmp_path):
    """The writer's own walk is current, another rank's is not: the writer plans again from the new reports (here:
    half of a tensor-parallel adapter gone, refused on every rank), never reuses the plan of the old ones."""
    writer, other = run_ranks(_one_rank_changes_run, 2, str(tmp_path))
    assert [w for w, _ in writer] == [1, 0, 0] and [w for w, _ in other] == [1, 1, 1]
    assert [p for _, p in writer] == [1, 1, 1]


def _collected_run(rank, world, out):
    import gc

    from megatron_peft_export import export_adapter
    from megatron_peft_export import host_snapshot as hs
    from tests.support.hook_loop import lora_model

    out = Path(out)
    model = lora_model(world, seed=5)
    export_adapter(model, out / "first")
    held = weakref.ref(model)
    del model
    gc.collect()
    gone = held() is None and not list(hs._LIVE.keys())
    counts = _Counts()
    model = lora_model(world, seed=6)  # built where the first one was: an id may be reused
    weights, made = _compared(rank, out, counts, export_adapter, model, "second")
    return gone, made, weights


def test_a_model_no_one_holds_is_collected_with_its_walk(tmp_path):
    """The cache holds no model alive; a model built after another one was collected is walked, never served the
    walk of the one before."""
    results = run_ranks(_collected_run, 2, str(tmp_path))
    for rank, (gone, made, _) in enumerate(results):
        assert gone, "the walk's cache kept the model alive"
        assert made == (1, 1 if rank == 0 else 0), "walked (and planned), not served the collected model's walk"
    first = (tmp_path / "first" / "adapter_model.safetensors").read_bytes()
    assert results[0][2] != first


def _hook_plans_run(rank, world, save):
    from megatron_peft_export import export_adapter
    from megatron_peft_export.config import HookConfig
    from megatron_peft_export.hook import AdapterExportHook
    from tests.support.hook_loop import checkpoint_dir, lora_model, optimizer_step
    from tests.support.tiny_gpt import apply_modelopt_lora, fill_lora_random

    model = lora_model(world)
    hook = AdapterExportHook(HookConfig())
    hook.prepare(model)
    counts = _Counts()
    made = []
    for iteration in range(1, 5):
        optimizer_step(model, iteration)
        if iteration == 3:
            fill_lora_random(apply_modelopt_lora(model, adapter_name="other", rank=4), seed=7)
        hook.on_checkpoint_saved(iteration, checkpoint_dir(save, iteration), model)
        hook.finalize()
        made.append(counts.take())
        _uncached(export_adapter, model, Path(save) / f"reference_{iteration}")
        counts.take()
    return made


def test_the_hooks_exports_plan_once_per_walk(tmp_path):
    """The hook's background exports of one walk are planned once (the writer's plan of the same walks), and again
    after the model changed; each adapter equals an export made from scratch."""
    results = run_ranks(_hook_plans_run, 2, str(tmp_path))
    assert [p for _, p in results[0]] == [1, 0, 1, 0]
    for iteration in range(1, 5):
        ours, reference = tmp_path / f"iter_{iteration:07d}" / "hf_adapter", tmp_path / f"reference_{iteration}"
        for name in ("adapter_model.safetensors", "adapter_config.json"):  # the card names the source
            assert (ours / name).read_bytes() == (reference / name).read_bytes(), (iteration, name)


def _own_copies_run(rank, world):
    import torch
    import torch.distributed as dist

    from megatron_peft_export import distributed as coll
    from megatron_peft_export import export as ex
    from megatron_peft_export.core.plan import apply_placements
    from megatron_peft_export.host_snapshot import live_snapshots
    from tests.support import tiny_moe
    from tests.support.hook_loop import lora_model
    from tests.support.tiny_gpt import apply_modelopt_lora

    results = []
    for build in ("gpt", "moe"):
        if build == "gpt":
            model = lora_model(world)
        else:
            tiny_moe.init_moe_parallel(tp=world)
            targets = ("*linear_qkv*", "*linear_proj*", *tiny_moe.ROUTED_EXPERT_TARGETS)
            model = apply_modelopt_lora(tiny_moe.build_moe_gpt(tiny_moe.MIXTRAL_LIKE), targets=targets)
            tiny_moe.fill_moe_lora_random(model, seed=31)
        options = ex.ExportOptions(model_type="mixtral" if build == "moe" else None, expert_layout="fused")
        layout = coll.RankLayout.from_megatron()
        snapshot = live_snapshots(model, layout, options).first
        reports = coll.all_gather(snapshot.report, coll.export_group())
        if rank != 0:
            continue
        planned = ex._planned(reports, options, None)
        positions = [n for n, (r, _, _) in enumerate(planned.ordered) if r == 0]
        fast, simple = (ex.allocate_adapter(planned, options, None) for _ in range(2))
        for t in (*fast.written.values(), *simple.written.values()):
            t.fill_(-7.0)  # what the other rank fills stays -7 in both
        shards = [snapshot.shards[planned.ordered[n][1]].tensor for n in positions]
        ex._place(shards, planned, (0, None), positions, fast)
        for n in positions:  # the simple path: each shard's placements, one by one
            apply_placements(
                simple.targets, planned.plan.placements[n], snapshot.shards[planned.ordered[n][1]].tensor.detach()
            )
        narrowed = len(planned.own[((0, None), fast.layout is not None)][3])  # placements that copy a slice
        same = all(torch.equal(fast.written[k], simple.written[k]) for k in simple.written)
        results.append((build, same, narrowed))
    dist.barrier()
    return results


def test_the_writers_own_shards_are_placed_as_placement_by_placement(tmp_path):
    """`_place` (every placement's views listed once, one bulk copy) fills the HF tensors as copying each shard's
    placements one by one does, at TP2 (slices of shards and of HF tensors), dense and MoE in the fused layout."""
    results, _ = run_ranks(_own_copies_run, 2)
    assert [build for build, _, _ in results] == ["gpt", "moe"]
    for build, same, narrowed in results:
        assert same and narrowed, build


def _outcome(export, *args, **kwargs) -> str:
    """'ok', or the error's type and message."""
    try:
        export(*args, **kwargs)
        return "ok"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def _unregistered_changes_run(rank, world, out):
    import copy

    import torch
    import torch.distributed as dist
    from megatron.core.tensor_parallel.layers import copy_tensor_model_parallel_attributes

    from megatron_peft_export import export_adapter
    from tests.support.hook_loop import lora_model

    out = Path(out)
    model = lora_model(world)
    layers = model.decoder.layers
    qkv, fc1, fc2, proj = (
        layers[0].self_attention.linear_qkv,
        layers[0].mlp.linear_fc1,
        layers[1].mlp.linear_fc2,
        layers[1].self_attention.linear_proj,
    )
    results = {}

    def step(name):
        cached = _outcome(export_adapter, model, out / name)
        fresh = _outcome(_uncached, export_adapter, model, out / f"{name}_reference")
        dist.barrier()
        same = cached == fresh == "ok" and (rank != 0 or _files(out / name) == _files(out / f"{name}_reference"))
        results[name] = (cached, fresh, same)

    step("first")
    from megatron_peft_export.host_snapshot import _LIVE

    (walk,) = _LIVE[model].values()
    results["probed"] = (len(walk.carriers), len(walk.probes.same[0]), len(walk.probes.equal[0]))
    child = copy.deepcopy(qkv.lora_a_default)
    with torch.no_grad():
        child.weight.add_(1.0)
    qkv._modules["lora_a_default"] = child  # no registration hook runs; the adapter entry still names the old one
    step("child_in_modules")  # the forward computes with the entry's module: refused, not exported from either
    qkv._lora_adapters["default"]["lora_a"] = child  # the entry too, in place: the model computes with `child`
    step("child_and_entry")
    weight = fc2.lora_b_default.weight
    new = torch.nn.Parameter(weight.detach().clone() + 2.0)
    copy_tensor_model_parallel_attributes(new, weight)
    fc2.lora_b_default._parameters["weight"] = new  # no registration hook runs; the old tensor is unchanged
    step("parameter_in_parameters")
    fc1.lora_b_default.weight.tensor_model_parallel = False  # the split is gone: refused from scratch
    step("not_tensor_parallel")
    fc1.lora_b_default.weight.tensor_model_parallel = True
    step("tensor_parallel_again")
    del proj.lora_a_default  # __delattr__ registers nothing
    step("child_deleted")
    return results


def test_children_and_parameters_replaced_without_registration_are_noticed(tmp_path):
    """A ModelOpt LoRA child set in `_modules` directly (alone: refused, as the forward computes with the adapter
    entry's module; then with the entry), a parameter set in `_parameters` directly, a tensor-parallel
    mark changed and a child deleted register nothing: the cached walk is still found stale, and each export equals
    (or fails as) an export made from scratch (before: the first two wrote the old weights, the third and fourth were
    exported where an export from scratch refuses)."""
    writer, _ = run_ranks(_unregistered_changes_run, 2, str(tmp_path))
    unprobed, same, equal = writer.pop("probed")
    assert unprobed == 0 and same > 0 and equal > 0, "every ModelOpt carrier is checked by its probes"
    for name, (cached, fresh, _) in writer.items():
        assert cached == fresh, name
    assert [name for name, (_, _, same) in writer.items() if same] == [
        "first",
        "child_and_entry",
        "parameter_in_parameters",
        "tensor_parallel_again",
    ]
    assert "computes with a lora_a module other than its registered lora_a_default" in writer["child_in_modules"][0]
    assert "do not fit the model" in writer["not_tensor_parallel"][0]
    deleted = writer["child_deleted"][0]  # named, not an AttributeError from inside the walk
    assert deleted.startswith("DialectError") and "lora_a_default.weight is missing" in deleted, deleted
    assert "decoder.layers.1.self_attention.linear_proj" in deleted, deleted


def _bridge_changes_run(rank, world, out, variant):
    import torch
    import torch.distributed as dist
    from megatron.core.tensor_parallel.layers import copy_tensor_model_parallel_attributes

    from megatron_peft_export import export_adapter
    from tests.support import real_bridge
    from tests.support.tiny_gpt import TinyGPTConfig, build_gpt, fill_lora_random, init_parallel

    out = Path(out) / variant
    init_parallel(tp=world, pp=1)
    model = real_bridge.apply(build_gpt(TinyGPTConfig()), variant, dim=8, alpha=16)
    fill_lora_random(model, seed=3)
    layers = model.decoder.layers
    qkv, fc1, fc2 = layers[0].self_attention.linear_qkv, layers[0].mlp.linear_fc1, layers[1].mlp.linear_fc2
    results = {}

    def step(name, **kwargs):
        cached = _outcome(export_adapter, model, out / name, **kwargs)
        fresh = _outcome(_uncached, export_adapter, model, out / f"{name}_reference", **kwargs)
        dist.barrier()
        same = cached == fresh == "ok" and (rank != 0 or _files(out / name) == _files(out / f"{name}_reference"))
        results[name] = (cached, fresh, same)

    def replaced(weight, delta):
        new = torch.nn.Parameter(weight.detach().clone() + delta)
        copy_tensor_model_parallel_attributes(new, weight)
        return new

    step("first")
    qkv.adapter.alpha = 32  # a plain attribute
    step("alpha")
    linear_in = qkv.adapter.linear_in
    child = type(linear_in).__new__(type(linear_in))
    child.__dict__.update(linear_in.__dict__)
    child.__dict__["_parameters"] = {**linear_in._parameters, "weight": replaced(linear_in.weight, 1.0)}
    qkv.adapter._modules["linear_in"] = child  # no registration hook runs
    step("child_in_modules")
    fc2.adapter.linear_out._parameters["weight"] = replaced(fc2.adapter.linear_out.weight, 2.0)
    step("parameter_in_parameters")
    if world > 1:
        fc1.adapter.linear_out.weight.tensor_model_parallel = False
        step("not_tensor_parallel")
        fc1.adapter.linear_out.weight.tensor_model_parallel = True
        step("tensor_parallel_again")
    if variant == "dora":
        magnitude = qkv.adapter.weight_magnitude
        qkv.adapter._parameters["weight_magnitude"] = torch.nn.Parameter(magnitude.detach().clone() * 3)
        step("magnitude_in_parameters")
    step("padded", pad_rank_to=16)
    step("bf16", dtype="bfloat16")
    return results


@pytest.mark.usefixtures("real_bridge")
@pytest.mark.parametrize("variant, world", [("lora", 2), ("dora", 1)])
def test_bridge_adapters_changed_without_registration_are_noticed(tmp_path, variant, world):
    """Megatron-Bridge LoRA (TP2) and DoRA (TP1, its only exported layout here): alpha set as an attribute, a child
    set in `_modules` directly, a weight or the DoRA magnitude set in `_parameters` directly, a tensor-parallel mark
    changed, other output options: each cached export equals (or fails as) an export made from scratch."""
    writer = run_ranks(_bridge_changes_run, world, str(tmp_path), variant)[0]
    for name, (cached, fresh, same) in writer.items():
        assert cached == fresh, name
        assert same or name == "not_tensor_parallel", name
    assert "do not fit the model" in writer.get("not_tensor_parallel", ("do not fit the model",))[0]
