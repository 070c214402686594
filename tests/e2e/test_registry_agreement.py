"""The live dialect match, the registry's reading of live parameter names, and the offline classification of the
checkpoint keys megatron-core writes agree, on real tiny models with ModelOpt and Megatron-Bridge adapters; and the
TP split the registry declares (what legacy per-rank files are read with) is the one megatron marks on the live
tensors."""

import re

import pytest

from tests.support.multiprocess import run_ranks

pytestmark = pytest.mark.timeout(300)
COLUMN_ONLY = ["linear_qkv", "linear_fc1"]  # Bridge DoRA on row-parallel linears at TP > 1 is refused


def _build(variant: str, tp: int, moe: bool):
    from tests.support import real_bridge, tiny_moe
    from tests.support.tiny_gpt import TinyGPTConfig, apply_modelopt_lora, build_gpt, init_parallel

    if moe:  # experts over expert parallelism (Bridge LoRA on expert linear_fc2 needs expert TP 1)
        tiny_moe.init_moe_parallel(tp=1, ep=tp)
        model = tiny_moe.build_moe_gpt(tiny_moe.QWEN2_MOE_LIKE)
    else:
        init_parallel(tp, 1)
        model = build_gpt(TinyGPTConfig())
    if variant == "modelopt":
        targets = ("*linear_qkv*", "*linear_proj*", "*linear_fc1*", "*linear_fc2*", "*output_layer*")
        return apply_modelopt_lora(model, targets=targets)
    targets = COLUMN_ONLY if variant == "dora" else None
    return real_bridge.apply(model, variant, dim=8, alpha=12, target_modules=targets)


def _checkpoint_entries(model) -> dict:
    """(module, role, part) -> stored row layout, for every adapter tensor in the model's sharded state dict, through
    the offline classification, each stacked axis expanded by the tensor's global offset."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    from megatron_peft_export.core.registry import expand
    from megatron_peft_export.offline.keys import classify

    state = model.sharded_state_dict()
    apply_factories(state)
    found = {}
    for tensor in nested_values(state):
        key = classify(tensor.key) if isinstance(tensor, ShardedTensor) else None
        if key is not None:
            assert tensor.prepend_axis_num == len(key.axes), tensor.key
            found[(expand(key.module, key.axes, tensor.global_offset[: len(key.axes)]), key.role, key.part)] = key
    return found


def _agree(rank, world, variant, moe):
    from megatron.core import parallel_state as ps

    from megatron_peft_export.core.registry import match_key
    from megatron_peft_export.dialects import collect

    model = _build(variant, world, moe)
    found = collect([model], "default", ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size())
    assert not found.refused and found.shards
    live = {(s.spec.module, s.spec.role, s.spec.part): s.spec.split_dim for s in found.shards}
    named = {}
    offset = ps.get_expert_model_parallel_rank() * (model.config.num_moe_experts or 0) // world
    for name, _ in model.named_parameters():  # local expert k of EP rank p is global expert p * local experts + k
        name = re.sub(r"(?<=\.local_experts\.)\d+", lambda m: str(int(m.group()) + offset), name)
        match = match_key(name)
        if match is not None:
            named[(match.module, match.tensor.role, match.part)] = match.tensor
    stored = _checkpoint_entries(model)
    assert set(live) == set(named) == set(stored), (
        sorted(set(live) ^ set(named))[:5],
        sorted(set(live) ^ set(stored))[:5],
    )
    if ps.get_tensor_model_parallel_world_size() > 1:  # at TP 1 nothing is split
        wrong = {k: (s, named[k].split_dim(k[0])) for k, s in live.items() if s != named[k].split_dim(k[0])}
        assert not wrong, wrong
    assert {k: stored[k].tensor for k in stored} == named
    return len(live)


@pytest.mark.parametrize("variant", ["modelopt", "lora", "canonical", "dora"])
def test_dense_live_names_and_checkpoint_keys_agree_at_tp2(variant):
    counts = run_ranks(_agree, 2, variant, False)
    assert counts[0] == counts[1] > 0


@pytest.mark.parametrize("variant", ["modelopt", "lora"])
def test_moe_live_names_and_checkpoint_keys_agree_at_ep2(variant):
    assert min(run_ranks(_agree, 2, variant, True)) > 0
