"""Weights & Biases: per-checkpoint verification metrics, the probe's top-k table, a histogram, the adapter artifact.

One process logs (the hook's writer, rank 0). It reuses the run active in that process (`wandb.run`,
e.g. the one Megatron-LM starts when it runs on the same rank) or starts its own when a project is
configured (Megatron-LM starts its run on the last rank, so with more than one rank the writer's run
is a separate one, named `<exp_name>-hf-adapter` and grouped under `<exp_name>` in the same project).
Metrics are logged against their own x-axis, `hf_adapter/iteration`, so they may arrive after the
training run has logged later steps. wandb is optional; nothing here ever raises into training.
"""

from __future__ import annotations

import atexit
import logging
import re
import sys
import threading
from pathlib import Path
from typing import Any

from ..io.checkpoints import iteration_name
from .verify import VerificationResult, VerifyConfig

log = logging.getLogger("megatron_peft_export")
PREFIX = "hf_adapter/"
STEP = PREFIX + "iteration"
_OWN_RUNS: list[WandbLogger] = []
_ATEXIT = threading.Lock()
TABLE_COLUMNS = ["sample", "position", "input", "hf_top_k", "megatron_top_k", "top1_match", "overlap"]


class WandbLogger:
    """Log verification results of one job; `finish()` ends the run it started (also at interpreter exit)."""

    def __init__(self, config: VerifyConfig) -> None:
        self.config = config
        self._run: Any = None
        """The run this logger started (or resumed); it finishes it."""
        self._reused: dict[str, Any] | None = None
        self._defined: set[int] = set()
        self._disabled = False

    def _get_run(self) -> Any:
        active = getattr(sys.modules.get("wandb"), "run", None)  # without wandb imported, no run is active
        if active is not None:
            # someone else's run (Megatron-LM's): remember it, to resume it once it is finished
            if active is not self._run:
                self._reused = {
                    "id": active.id,
                    "project": active.project,
                    "entity": active.entity,
                    "dir": getattr(active.settings, "root_dir", None),
                }
            return active
        if self._run is not None:
            return self._run
        if self._reused is None and not self.config.wandb_project:
            return None
        try:
            import wandb
        except ImportError:
            self._disabled = True
            log.warning(
                "W&B logging of the HF adapter verification is off: wandb is not installed (pip install "
                "'megatron-peft-export[wandb]')"
            )
            return None
        # the run we logged into has finished (Megatron-LM ends it before the last export): resume it
        if self._reused is not None:
            reused = self._reused
            self._run = wandb.init(
                id=reused["id"],
                project=reused["project"],
                entity=reused["entity"],
                dir=reused["dir"] or self.config.wandb_save_dir,
                resume="allow",
            )
        else:
            name = self.config.wandb_exp_name
            self._run = wandb.init(
                project=self.config.wandb_project,
                entity=self.config.wandb_entity,
                name=f"{name}-hf-adapter" if name else None,
                group=name,
                dir=self.config.wandb_save_dir,
                job_type="hf-adapter-verification",
                config={"verify": {k: v for k, v in vars(self.config).items() if not k.startswith("wandb")}},
            )
        with _ATEXIT:
            if not _OWN_RUNS:
                atexit.register(finish_all)
            _OWN_RUNS.append(self)
        return self._run

    def log(self, result: VerificationResult, iteration: int, adapter_dir: str | Path) -> None:
        """Log one checkpoint's verification (and the adapter as an artifact when configured); never raises."""
        if self._disabled:
            return
        run = None
        for attempt in (1, 2):
            try:
                run = self._get_run()
                if run is not None:
                    self._log_to(run, result, iteration, Path(adapter_dir))
                return
            except Exception as exc:  # W&B is never the reason training stops
                if attempt == 1 and getattr(run, "_is_finished", False) and self._reused is not None:
                    continue  # the reused run ended while we logged (Megatron-LM finishing it): log into it resumed
                log.warning(
                    "W&B logging of the HF adapter verification for iteration %d failed; training continues: %s: %s",
                    iteration,
                    type(exc).__name__,
                    exc,
                )
                return

    def _log_to(self, run: Any, result: VerificationResult, iteration: int, adapter_dir: Path) -> None:
        if id(run) not in self._defined:
            run.define_metric(STEP)
            run.define_metric(PREFIX + "*", step_metric=STEP)
            self._defined.add(id(run))
        run.log(payload(result, iteration))
        if self.config.wandb_artifact:
            self._log_artifact(run, result, iteration, adapter_dir)

    def _log_artifact(self, run: Any, result: VerificationResult, iteration: int, adapter_dir: Path) -> None:
        import wandb

        name = re.sub(
            r"[^\w.-]+", "-", f"{self.config.wandb_exp_name}-hf-adapter" if self.config.wandb_exp_name else "hf-adapter"
        )
        metadata = {"iteration": iteration, "verification": result.status, **result.metrics()}
        artifact = wandb.Artifact(name, type="model", description=result.summary, metadata=metadata)
        artifact.add_dir(str(adapter_dir))
        run.log_artifact(artifact, aliases=[iteration_name(iteration), "latest"])

    def finish(self) -> None:
        """End the run this logger started (a reused run belongs to whoever started it)."""
        run, self._run = self._run, None
        if run is not None:
            try:
                run.finish()
            except Exception as exc:
                log.warning("finishing the W&B run failed: %s", exc)


def finish_all() -> None:
    """Finish every run started here (registered at exit; call it yourself where processes leave with os._exit)."""
    with _ATEXIT:
        loggers = list(_OWN_RUNS)
        _OWN_RUNS.clear()
    for logger in loggers:
        logger.finish()


def payload(result: VerificationResult, iteration: int) -> dict[str, Any]:
    """The dictionary logged for one checkpoint: metrics, status, the top-k table, the difference histogram."""
    import wandb

    out: dict[str, Any] = {STEP: iteration, PREFIX + "verify/status": result.status}
    if result.status == "skipped":
        out[PREFIX + "verify/skipped"] = 1
        return out
    out[PREFIX + "verify/passed"] = int(result.passed)
    out[PREFIX + "verify/failures"] = len(result.failures)
    out.update({PREFIX + f"verify/{name}": value for name, value in result.metrics().items()})
    if result.top_k_table:
        out[PREFIX + "verify/top_k"] = wandb.Table(columns=TABLE_COLUMNS, data=[_row(r) for r in result.top_k_table])
    if result.logit_diff_histogram:
        h = result.logit_diff_histogram
        out[PREFIX + "verify/logit_diff"] = wandb.Histogram(np_histogram=(h["counts"], h["edges"]))
    return out


def _row(row: dict[str, Any]) -> list[Any]:
    def tokens(ids, names):
        return " | ".join(f"{i} {n!r}" for i, n in zip(ids, names)) if names else " | ".join(str(i) for i in ids)

    overlap = len(set(row["hf_top_k"]) & set(row["megatron_top_k"])) / max(1, len(row["hf_top_k"]))
    return [
        row["sample"],
        row["position"],
        tokens([row["input_id"]], [row["input_token"]] if "input_token" in row else None),
        tokens(row["hf_top_k"], row.get("hf_tokens")),
        tokens(row["megatron_top_k"], row.get("megatron_tokens")),
        row["top1_match"],
        overlap,
    ]
