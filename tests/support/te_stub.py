"""A stand-in for the two Transformer Engine names Megatron-Bridge's PEFT modules need to import.

Why: Transformer Engine is GPU-only and not installable here, and Bridge's `peft/lora.py` and
`peft/lora_layers.py` import `transformer_engine.pytorch` at module level: they subclass `te.Linear`
(TELinearAdapter) and annotate with `te.ops.Sequential` (TEFusedLoRALinear), evaluated at import. Nothing
else of TE is touched on the megatron-core local-spec layers the tests use (`module.__class__ == te.Linear`
is simply False). The stand-ins cannot be instantiated, so a code path that really needs TE fails loudly.

Only Bridge may see these modules: `real_bridge.load_peft` puts them in `sys.modules` for the duration of
Bridge's import and removes them afterwards, so megatron-core keeps its no-TE code paths.
"""

from __future__ import annotations

import types

import torch


class _Unavailable(torch.nn.Module):
    def __init__(self, *args, **kwargs) -> None:
        raise NotImplementedError(
            f"{type(self).__qualname__} is a Transformer Engine stand-in for imports only (tests/support/te_stub.py)"
        )


def modules() -> dict[str, types.ModuleType]:
    """`transformer_engine`, `transformer_engine.pytorch` and `.ops`, holding only `Linear` and `ops.Sequential`."""
    te = types.ModuleType("transformer_engine")
    pytorch = types.ModuleType("transformer_engine.pytorch")
    ops = types.ModuleType("transformer_engine.pytorch.ops")
    pytorch.Linear = type("Linear", (_Unavailable,), {"__module__": pytorch.__name__})
    ops.Sequential = type("Sequential", (_Unavailable,), {"__module__": ops.__name__})
    te.pytorch, pytorch.ops = pytorch, ops
    return {m.__name__: m for m in (te, pytorch, ops)}
