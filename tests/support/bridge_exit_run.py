"""One rank of a Megatron-Bridge run that leaves the way Bridge's train() does at its exit interval: a final save, then
sys.exit.

    RANK=r WORLD_SIZE=n MASTER_ADDR=127.0.0.1 MASTER_PORT=p python -m tests.support.bridge_exit_run SAVE_DIR
    HUB_ENDPOINT

Bridge's own CallbackManager (tests/support/real_bridge.py) fires `on_checkpoint_save` of HFAdapterExportCallback at
steps 2
and 4 on the tiny GPT with Bridge's LoRA, the hook pushing to the Hub with strategy "end"; then the process exits by
`sys.exit(0)` without `on_train_end`, as Bridge's train() does on exit-interval, exit-duration and exit signals. A real
process, not a forked test rank: those leave by os._exit, which skips interpreter exit.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace


def main(save: str, endpoint: str) -> None:
    import torch
    import torch.distributed as dist

    from tests.support.cpu_shims import install_cpu_shims

    torch.set_num_threads(1)
    install_cpu_shims()
    dist.init_process_group("gloo")
    from megatron_peft_export.config import HookConfig
    from megatron_peft_export.integrations.megatron_bridge import HFAdapterExportCallback
    from megatron_peft_export.services.hub import PushConfig
    from tests.support import real_bridge
    from tests.support.hook_loop import checkpoint_dir
    from tests.support.tiny_gpt import TinyGPTConfig, build_gpt, fill_lora_random, init_parallel

    callbacks = real_bridge.load_callbacks()
    init_parallel(tp=dist.get_world_size())
    model = real_bridge.apply(build_gpt(TinyGPTConfig()))
    fill_lora_random(model, seed=5)
    push = PushConfig(repo_id="me/run", strategy="end", endpoint=endpoint, retry_wait=0.0)
    manager = callbacks.normalize_callbacks([HFAdapterExportCallback(HookConfig(push=push))])
    checkpoint = SimpleNamespace(save=save, async_save=False)
    for step in (2, 4):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".adapter." in name:
                    p.add_(0.01 * step)
        checkpoint_dir(save, step)
        state = SimpleNamespace(cfg=SimpleNamespace(checkpoint=checkpoint), train_state=SimpleNamespace(step=step))
        manager.fire(
            "on_checkpoint_save", callbacks.CallbackContext(state=state, model=[model], user_state=manager.user_state)
        )
    Path(save, f"rank{dist.get_rank()}.exiting").touch()
    sys.exit(0)


if __name__ == "__main__":
    main(*sys.argv[1:3])
