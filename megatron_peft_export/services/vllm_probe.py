"""Ask vLLM itself what it does with LoRA adapters: run by a python that has vLLM (`serving_vllm` starts it).

    python vllm_probe.py JOB.json RESULT.json

JOB: {"base": base model directory or null, "adapters": {name: directory}, "weights_file": the weights file's name
in each}. Standalone on purpose: it imports
vLLM and nothing of this package (vLLM lives in its own venv, with its own torch and transformers).

For each adapter, vLLM's own code: `PEFTHelper.from_local_dir` and `validate_legal` (what it refuses in the
config), `get_rank_and_scaling` per module (the scale it applies). With a base model: the model class for its
architecture, built on the meta device (no weights, no memory), with vLLM's LoRA manager around it, exactly as
an engine makes it; then `WorkerLoRAManager._load_adapter` (the names it expects, the MoE layout checks),
`add_adapter` (packing q/k/v, gate/up and experts into the model's modules) and `activate_adapter` (copying into
the LoRA buffers; on meta, shapes are checked and nothing is stored). Every module name vLLM asks its loaded
adapter for is recorded: a module loaded and never asked for is applied nowhere. A fused expert adapter refused
for its layout is tried again with `enable_mixed_moe_lora_format` and `is_3d_lora_weight`, and reported as
needing them.

RESULT: {"vllm": version, "model": {...} or null, "model_error": str or null, "adapters": {name: {"refused": str
or null, "flags": [...], "scaling": {module: [rank, scaling]}, "loaded": [...], "applied": {module: [parts]},
"nowhere": [...], "probe_error": set when the probe itself failed on this vLLM's internals (private APIs it uses:
WorkerLoRAManager._load_adapter, LoRAModelManager._get_lora_layer_weights, as in 0.31-0.32)}}}.
"""

import json
import os
import socket
import sys
import traceback

MIXED_FLAG = "enable_mixed_moe_lora_format"


def _message(exc):
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:600]


class _Engine:
    """A vLLM model (meta device) with its LoRA manager, for one set of engine flags."""

    def __init__(self, base, mixed):
        import torch
        from vllm.config import set_current_vllm_config
        from vllm.engine.arg_utils import EngineArgs
        from vllm.lora.worker_manager import WorkerLoRAManager
        from vllm.model_executor.model_loader.utils import initialize_model, process_weights_after_loading

        extra = {MIXED_FLAG: True} if mixed else {}
        args = EngineArgs(
            model=base,
            enable_lora=True,
            max_lora_rank=512,
            max_loras=1,
            skip_tokenizer_init=True,
            load_format="dummy",
            enforce_eager=True,
            **extra,
        )
        self.config = args.create_engine_config()
        self.scope = set_current_vllm_config(self.config)
        self.scope.__enter__()
        _init_distributed()
        meta = torch.device("meta")
        with meta:
            model = initialize_model(self.config)
        process_weights_after_loading(model, self.config.model_config, meta)  # MoE kernels are chosen here
        self.workers = WorkerLoRAManager(self.config, meta, getattr(model, "embedding_modules", {}))
        self.workers.create_lora_manager(model, self.config)
        self.manager = self.workers._adapter_manager
        self.model = model

    def describe(self):
        manager = self.manager
        return {
            "class": type(self.model).__name__,
            "lora_modules": sorted(manager.supported_lora_modules),
            "packed": {k: v for k, v in manager.packed_modules_mapping.items() if k != "experts"},
            "modules": len(manager.modules),
        }

    def load(self, name, path, lora_id, is_3d):
        """(loaded module names, {module: parts applied}, [loaded names applied nowhere]); raises what vLLM raises."""
        from vllm.lora.request import LoRARequest

        manager = self.manager
        lora = self.workers._load_adapter(LoRARequest(name, lora_id, path, is_3d_lora_weight=is_3d))
        loaded = sorted(lora.loras)
        asked = set()
        original = manager._get_lora_layer_weights

        def spy(lora_model, module_name):
            found = original(lora_model, module_name)
            if found is not None:
                asked.add(module_name)
            return found

        manager._get_lora_layer_weights = spy
        try:
            manager.add_adapter(lora)
            manager.activate_adapter(lora_id)
        finally:
            manager._get_lora_layer_weights = original
            manager.remove_adapter(lora_id)
        applied = {}
        for module in manager.modules:
            parts = manager.packed_modules.get(module, []) + [module, module + ".base_layer"]
            got = sorted(p for p in parts if p in asked and p in loaded)
            if got:
                applied[module] = got
        return loaded, applied, sorted(set(loaded) - asked)


def _init_distributed():
    from vllm.distributed.parallel_state import (
        ensure_model_parallel_initialized,
        init_distributed_environment,
        model_parallel_is_initialized,
    )

    if model_parallel_is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init_distributed_environment(
        world_size=1, rank=0, local_rank=0, distributed_init_method=f"tcp://127.0.0.1:{port}", backend="gloo"
    )
    ensure_model_parallel_initialized(1, 1)


def _helper_checks(path, weights_file, max_positions):
    """vLLM's config checks and per-module scaling; (refusal or None, {module: [rank, scaling]})."""
    from safetensors import safe_open
    from vllm.config.lora import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.lora.utils import parse_fine_tuned_lora_name

    helper = PEFTHelper.from_local_dir(path, max_positions)
    try:
        helper.validate_legal(LoRAConfig(max_lora_rank=512, max_loras=1))
    except ValueError as exc:
        return _message(exc), {}
    scaling = {}
    weights = os.path.join(path, weights_file)
    with safe_open(weights, "pt") as f:
        for key in f.keys():
            try:
                module, _ = parse_fine_tuned_lora_name(key)
            except ValueError:
                continue
            scaling[module] = list(helper.get_rank_and_scaling(module))
    return None, scaling


def main(job_path, result_path):
    with open(job_path) as f:
        job = json.load(f)
    import vllm

    result = {"vllm": vllm.__version__, "model": None, "model_error": None, "adapters": {}}
    engines = {}
    max_positions = None
    if job.get("base"):
        try:
            engines[False] = _Engine(job["base"], mixed=False)
            result["model"] = engines[False].describe()
            max_positions = getattr(
                engines[False].config.model_config.hf_config.get_text_config(), "max_position_embeddings", None
            )
        except Exception as exc:
            result["model_error"] = _message(exc)
            result["model_traceback"] = traceback.format_exc()[-2000:]
    for lora_id, (name, path) in enumerate(job["adapters"].items(), start=1):
        entry = {"refused": None, "flags": [], "scaling": {}, "loaded": [], "applied": {}, "nowhere": []}
        result["adapters"][name] = entry
        try:
            entry["refused"], entry["scaling"] = _helper_checks(path, job["weights_file"], max_positions)
            if entry["refused"] or False not in engines:
                continue
            try:
                loaded = engines[False].load(name, path, lora_id, is_3d=False)
            except ValueError as exc:
                if MIXED_FLAG not in str(exc):
                    raise
                if True not in engines:
                    engines[True] = _Engine(job["base"], mixed=True)
                loaded = engines[True].load(name, path, lora_id, is_3d=True)
                entry["flags"] = [MIXED_FLAG, "is_3d_lora_weight"]
            entry["loaded"], entry["applied"], entry["nowhere"] = loaded
        except (AttributeError, ImportError, NameError) as exc:  # this vLLM's internals differ from the ones probed
            entry["probe_error"] = _message(exc)
        except Exception as exc:  # vLLM refuses the adapter: its message is the finding
            entry["refused"] = _message(exc)
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
