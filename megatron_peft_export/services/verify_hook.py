"""The hook's `verify:` option as the hook's two extension points.

- capture (training thread, every rank, each exported save): the training model's reference logits
  on the probe, published inside the adapter as `verification/reference.safetensors`;
- after publish (the writer, in the background): verify the adapter with transformers + peft (in a
  process of their own, see `verify_worker`), write `verification.json`, log one summary line, and log
  to W&B when enabled.

Neither step ever stops training: a failed capture leaves the adapter without a reference (and its
verification skipped, or failed when required); a failed verification is a logged, recorded result.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..core.options import MLM, from_args
from ..io.hf_config import read_hf_config
from .verify import (
    REFERENCE_FILE,
    VerificationInputError,
    VerificationResult,
    VerifyConfig,
    reference_bytes,
    resolve_base_model,
    skipped,
)
from .verify_worker import VerifyProcess

log = logging.getLogger("megatron_peft_export")
Capture = Callable[[Any, int], "dict[str, bytes] | None"]
AfterPublish = Callable[[int, Path], None]


class Verification:
    """Capture at save, verify after publish, log to W&B: built from the hook's config."""

    def __init__(self, config: VerifyConfig, base_model_name_or_path: str | None = None) -> None:
        self.config = config
        self.base_model = config.base_model or base_model_name_or_path
        self.results: list[VerificationResult] = []
        """This process's verification results, in publish order (the writer's; empty elsewhere)."""
        self._process = VerifyProcess()
        self.wandb = None
        if config.wandb:
            from .wandb_log import WandbLogger

            self.wandb = WandbLogger(config)

    def capture(self, model: Any, iteration: int) -> dict[str, bytes] | None:
        """Collective (every rank): the reference file on rank 0, None elsewhere or when capture fails."""
        import torch.distributed as dist

        from .reference import capture_reference

        rank = dist.get_rank()
        hf_vocab = None
        if rank == 0:
            try:  # rank 0 alone: nothing here may raise before the collectives below
                hf_vocab = (read_hf_config(resolve_base_model(self.base_model)) or {}).get("vocab_size")
            except Exception as exc:
                log.warning(
                    "cannot read the base model's vocabulary size (%s); the probe stays below Megatron's padding", exc
                )
        try:
            reference = capture_reference(model, self.config, iteration=iteration, hf_vocab=hf_vocab)
        except Exception as exc:  # the same config error on every rank (agreed before any forward pass)
            if rank == 0:
                log.warning("no reference logits for iteration %d (its adapter cannot be verified): %s", iteration, exc)
            return None
        return None if reference is None else {REFERENCE_FILE: reference_bytes(reference)}

    def after_publish(self, iteration: int, path: Path) -> None:
        """Verify the published adapter, record verification.json, log the summary and to W&B; never raises."""
        result = self.run(iteration, Path(path))
        self.results.append(result)
        try:
            result.write(path)
        except OSError as exc:
            log.warning("cannot write %s/verification.json: %s", path, exc)
        level = (
            logging.INFO
            if result.status == "passed"
            else logging.WARNING
            if result.status == "skipped"
            else logging.ERROR
        )
        log.log(level, "%s", result.summary)
        if self.wandb is not None:
            self.wandb.log(result, iteration, path)

    def run(self, iteration: int, path: Path) -> VerificationResult:
        required = self.config.required
        if not (path / REFERENCE_FILE).is_file():
            return skipped(
                path,
                f"no reference logits ({REFERENCE_FILE}) were captured at save time; see the warning logged at "
                f"that save",
                failed=required,
                iteration=iteration,
            )
        base_dir = resolve_base_model(self.base_model)
        if base_dir is None:
            return skipped(
                path,
                f"no base model available locally ({self.base_model or 'none configured'}); set verify.base_model "
                f"(--hf-adapter-verify-base-model) to a local HF model directory"
                + ("" if required else ", or verify.required to make this a failure"),
                failed=required,
                iteration=iteration,
            )
        try:
            return self._process.verify(path, base_dir, self.config)
        except VerificationInputError as exc:  # e.g. a base model that does not fit the adapter: a failure, not a skip
            return skipped(path, str(exc), failed=True, iteration=iteration)
        except Exception as exc:
            return skipped(path, f"verification crashed: {type(exc).__name__}: {exc}", failed=True, iteration=iteration)

    def finish(self) -> None:
        self._process.close()
        if self.wandb is not None:
            self.wandb.finish()


def extensions(
    config: Any, capture: Capture | None = None, after_publish: Sequence[AfterPublish] = ()
) -> tuple[Capture | None, tuple[AfterPublish, ...], Verification | None]:
    """The hook's capture and after-publish steps with verification added when `config.verify` is set."""
    verify = getattr(config, "verify", None)
    if verify is None:
        return capture, tuple(after_publish), None
    verification = Verification(verify, config.base_model_name_or_path)
    if capture is None:
        combined = verification.capture
    else:

        def combined(model: Any, iteration: int) -> dict[str, bytes] | None:
            ours, theirs = verification.capture(model, iteration), capture(model, iteration)
            return {**(ours or {}), **(theirs or {})} or None

    return combined, (verification.after_publish, *after_publish), verification


def verify_config_from_args(args: Any) -> VerifyConfig | None:
    """The verify section from Megatron-LM args (None without --hf-adapter-verify); W&B from Megatron-LM's own
    --wandb-* flags, the run files under <save>/wandb unless --wandb-save-dir says otherwise (as Megatron-LM's)."""
    if not getattr(args, "hf_adapter_verify", False):
        return None
    values = from_args(args, "verify", MLM)
    if values.get("wandb_save_dir") is None and getattr(args, "save", None):
        values["wandb_save_dir"] = str(Path(args.save) / "wandb")
    return VerifyConfig(**values)
