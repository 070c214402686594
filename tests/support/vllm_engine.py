"""Serve adapters with the real vLLM (run by the vLLM venv's python, not the project's): one engine, many adapters.

    python vllm_engine.py JOB.json RESULT.json

JOB: {"base": dir, "engine": {extra LLM kwargs}, "max_lora_rank": int, "prompts": [[token ids]], "max_tokens": int,
      "adapters": [{"name", "path", "mode": "generate" | "loaded", "is_3d": bool}]}
RESULT: {"vllm": version, "base": {"tokens", "logprobs"}, "adapters": {name: {...}}} where an adapter's entry is
  {"error": "..."} when vLLM refused it, else for "generate" the greedy tokens and their log-probs per prompt, and
  for "loaded" the path of a safetensors file with what vLLM holds for it in its LoRA buffers after activating it:
  per wrapped module and slice, lora_B @ lora_A (scaling folded in, as vLLM applies it), float64.

vLLM's offline LLM in one process (VLLM_ENABLE_V1_MULTIPROCESSING=0, set by the caller), so `apply_model` reaches
the model and its LoRA manager directly. MoE LoRA generation needs Triton, which has no CPU backend: MoE adapters
use "loaded".
"""

import json
import sys
import traceback


def _deltas(model, lora_id):
    """What the LoRA layers hold for `lora_id` once vLLM activates it: {module.slice: B @ A} (MoE: [experts, out,
    in])."""
    manager = model.lora_manager
    manager.activate_adapter(lora_id)
    slot = manager.lora_index_to_id.index(lora_id)
    out = {}
    for name, module in manager.modules.items():
        if hasattr(module, "w13_lora_a_stacked"):  # FusedMoEWithLoRA: w1 (gate), w3 (up), w2 (down) per expert
            pairs = {
                "w1": (module.w13_lora_a_stacked[0], module.w13_lora_b_stacked[0]),
                "w2": (module.w2_lora_a_stacked[0], module.w2_lora_b_stacked[0]),
            }
            if len(module.w13_lora_a_stacked) > 1:
                pairs["w3"] = (module.w13_lora_a_stacked[1], module.w13_lora_b_stacked[1])
            for part, (a, b) in pairs.items():
                out[f"{name}.{part}"] = (b[slot].double() @ a[slot].double()).contiguous()
            continue
        a_all, b_all = module.lora_a_stacked, module.lora_b_stacked
        a_all = a_all if isinstance(a_all, (tuple, list)) else (a_all,)
        b_all = b_all if isinstance(b_all, (tuple, list)) else (b_all,)
        for i, (a, b) in enumerate(zip(a_all, b_all)):
            out[f"{name}.{i}"] = (b[slot, 0].double() @ a[slot, 0].double()).contiguous()
    return {k: v.cpu() for k, v in out.items()}


def main(job_path, result_path):
    with open(job_path) as f:
        job = json.load(f)
    import vllm
    from safetensors.torch import save_file
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    llm = LLM(
        model=job["base"],
        dtype="float32",
        enable_lora=True,
        max_lora_rank=job["max_lora_rank"],
        max_loras=1,
        max_model_len=64,
        enforce_eager=True,
        max_num_seqs=max(1, len(job["prompts"])),
        seed=0,
        kv_cache_memory_bytes=32 << 20,
        **job.get("engine", {}),
    )
    params = SamplingParams(max_tokens=job["max_tokens"], temperature=0.0, logprobs=0, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in job["prompts"]]

    def generate(request=None):
        outputs = llm.generate(prompts, params, lora_request=request, use_tqdm=False)
        tokens = [list(o.outputs[0].token_ids) for o in outputs]
        logprobs = [
            [step[t].logprob for t, step in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)] for o in outputs
        ]
        return {"tokens": tokens, "logprobs": logprobs}

    result = {"vllm": vllm.__version__, "base": generate() if prompts else None, "adapters": {}}
    for lora_id, adapter in enumerate(job["adapters"], start=1):
        request = LoRARequest(adapter["name"], lora_id, adapter["path"], is_3d_lora_weight=adapter.get("is_3d", False))
        try:
            llm.llm_engine.add_lora(request)  # loading and vLLM's own validation; raises on what it refuses
            if adapter["mode"] == "generate":
                entry = generate(request)
            else:
                deltas = llm.apply_model(lambda model, lora_id=lora_id: _deltas(model, lora_id))[0]
                path = f"{result_path}.{adapter['name']}.safetensors"
                save_file(deltas, path)
                entry = {"deltas": path}
        except Exception as exc:  # what vLLM says when it refuses the adapter
            entry = {
                "error": f"{type(exc).__name__}: {' '.join(str(exc).split())}",
                "traceback": traceback.format_exc()[-3000:],
            }
        finally:
            try:
                llm.llm_engine.remove_lora(lora_id)
            except Exception:
                pass
        result["adapters"][adapter["name"]] = entry
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
