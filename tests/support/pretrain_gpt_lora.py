"""One rank of a real Megatron-LM run: the stock ``pretrain_gpt.py``, as a user fine-tuning with ModelOpt LoRA runs it.

Started by ``tests.support.megatron_lm.launch`` (one process per rank, torchrun's environment) with Megatron-LM's
own flags. Before ``pretrain_gpt.py`` runs as ``__main__``, this adds what such a user adds:

- the README's two lines (``megatron_lm.install()``), so ``--export-hf-adapter`` and friends work;
- ModelOpt LoRA on the model the stock ``gpt_builder`` builds, after loading the tiny base weights of
  ``tests.support.tiny_gpt`` into it (a fine-tune starts from a known base; the HF twin holds the same weights);

and, for a CPU machine, the shims of ``tests.support.cpu_shims.install_megatron_lm_cpu_shims``. Nothing of
Megatron-LM's training loop, checkpointing or exit paths is replaced.

With ``$PROBE_LOGITS_OUT`` set, however ``pretrain()`` ends (return, ``sys.exit`` on an exit condition), every
rank computes the trained model's logits on ``tiny_gpt.sample_tokens(cfg, 2, seed=7)`` with the test support's
own forward (``tiny_gpt.megatron_logits``) and rank 0 writes them there (safetensors: tokens, logits).

Everything is imported inside ``main``: Megatron's checkpoint writer starts helper processes with the spawn
method, which import this file again (see ``_run_as_main``).
"""

import os
import sys
from pathlib import Path

PROBE_SEED = 7
LORA = {"rank": 8, "scale": 2.0}


def main() -> None:
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # a hung run's stacks, for the test's failure report
    megatron_lm_dir = Path(os.environ["MEGATRON_LM"])
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: tests.support, the package
    sys.path.insert(0, str(megatron_lm_dir))
    import warnings

    warnings.filterwarnings("ignore")  # Megatron's and ModelOpt's CPU / missing-package notices, on every rank

    from tests.support.cpu_shims import install_megatron_lm_cpu_shims

    install_megatron_lm_cpu_shims()

    from megatron_peft_export.integrations import megatron_lm  # the README's two lines

    megatron_lm.install()

    built = _lora_on_the_stock_builder()
    script = megatron_lm_dir / "pretrain_gpt.py"
    sys.argv = [str(script), *sys.argv[1:]]
    try:
        _run_as_main(script)
    finally:
        if os.environ.get("PROBE_LOGITS_OUT") and built:
            _write_probe_logits(built[-1], Path(os.environ["PROBE_LOGITS_OUT"]))


def _run_as_main(script: Path) -> None:
    """Run ``script`` as ``python script`` would (``__name__ == "__main__"``), in a namespace of its own while
    ``sys.modules["__main__"]`` stays this file: the processes Megatron starts with spawn (torch_dist's results
    queue Manager, the persistent checkpoint worker) import ``__main__`` again, and this file imports in a
    fraction of a second where pretrain_gpt.py takes ~10 s. Nothing pickles a function of pretrain_gpt.py."""
    import builtins

    namespace = {"__name__": "__main__", "__file__": str(script), "__builtins__": builtins}
    exec(compile(script.read_text(), str(script), "exec"), namespace)


def _lora_on_the_stock_builder() -> list:
    """Wrap ``gpt_builders.gpt_builder`` (pretrain_gpt.py imports it by name when it runs): tiny base weights, then
    ModelOpt LoRA. Returns the list the built models are appended to."""
    import gpt_builders

    from tests.support import tiny_gpt

    stock, built = gpt_builders.gpt_builder, []

    def gpt_builder(args, pre_process, post_process, vp_stage=None, config=None, pg_collection=None):
        model = stock(args, pre_process, post_process, vp_stage=vp_stage, config=config, pg_collection=pg_collection)
        tiny_gpt.load_weights(model, tiny_gpt.global_base_weights(tiny_config(args)))
        tiny_gpt.apply_modelopt_lora(model, **LORA)
        built.append(model)
        return model

    gpt_builders.gpt_builder = gpt_builder
    return built


def tiny_config(args):
    """The ``TinyGPTConfig`` Megatron-LM's arguments describe (``megatron_lm.tiny_gpt_flags`` wrote them)."""
    from tests.support.tiny_gpt import TinyGPTConfig

    return TinyGPTConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        kv_channels=args.kv_channels,
        ffn_hidden_size=args.ffn_hidden_size,
        vocab_size=args.padded_vocab_size,
        seq_length=args.seq_length,
        gated_linear_unit=args.swiglu,
        rotary_base=args.rotary_base,
        layernorm_epsilon=args.layernorm_epsilon,
    )


def _write_probe_logits(model, out: Path) -> None:
    import torch.distributed as dist
    from megatron.training import get_args
    from safetensors.torch import save_file

    from tests.support import tiny_gpt

    tokens = tiny_gpt.sample_tokens(tiny_config(get_args()), batch=2, seed=PROBE_SEED)
    logits = tiny_gpt.megatron_logits(model, tokens)  # every rank
    if dist.get_rank() == 0:
        save_file({"tokens": tokens, "logits": logits}, str(out))


if __name__ == "__main__":
    main()
