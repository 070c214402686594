"""Several named adapters of one model in peft's multi-adapter layout, published as one directory.

ModelOpt holds any number of named adapters per model (`lora_a_<name>`, `lora_b_<name>`). peft's
`save_pretrained` writes the adapter named "default" at the root of a directory and every other one
under `<dir>/<name>/`, each with its own config; `PeftModel.from_pretrained(base, dir)` then
`load_adapter(f"{dir}/{name}", adapter_name=name)` and `set_adapter(name)` bring each back.

Each adapter goes through the single-adapter export (`run_export`: same planner, same checks, same
collectives), one after the other on every rank: the first into the staging directory of the whole
tree, each other into a subdirectory of that staging directory. Only then is the tree published, by one
rename, so a reader sees all the adapters or none.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from . import distributed as coll
from .core.names import RULE, is_name
from .core.options import check_selection
from .dialects import LocalShard
from .errors import ExportError, NoAdaptersError
from .export import WRITER, ExportOptions, Snapshot, run_export, take_snapshot
from .io.atomic_dir import discard, publish
from .io.peft_dir import FILES, append_card

log = logging.getLogger("megatron_peft_export")
ALL = "all"
Selection = Sequence[str] | Literal["all"]
RESERVED = frozenset({"verification", *FILES})
LAYOUT_HEADING = "\n## Adapters in this directory\n"


@dataclass
class AdapterSnapshots:
    """One rank's snapshot of each adapter it holds (or was asked for), taken at one moment."""

    selection: Selection | None
    """None: the one adapter of `ExportOptions.adapter_name`, exported as `export_adapter` writes it."""
    snapshots: dict[str, Snapshot]
    first: Snapshot
    """The snapshot taken first: its report carries the model facts (geometry, dialects) every adapter shares."""
    copied: Any = None
    """A CUDA event the copy into host memory records when it is asynchronous (see `wait`); None: already copied."""

    @property
    def shards(self) -> list[LocalShard]:
        """Every adapter's shards, first adapter first."""
        return [shard for s in self.snapshots.values() for shard in s.shards]

    def wait(self) -> None:
        """Block until the shards hold the copied values (an asynchronous device-to-host copy has completed)."""
        if self.copied is not None:
            self.copied.synchronize()

    def of(self, name: str) -> Snapshot:
        """This rank's snapshot of `name`; a rank without that adapter sends its report and no shards."""
        found = self.snapshots.get(name)
        if found is not None:
            return found
        return Snapshot(dataclasses.replace(self.first.report, specs=[]), [])


def take_snapshots(
    model: Any, layout: coll.RankLayout, options: ExportOptions, selection: Selection, *, copy: bool
) -> AdapterSnapshots:
    """This rank's shards of every selected adapter ("all": every adapter this rank holds; None: the one adapter of
    `options.adapter_name`)."""
    selection = check_selection(selection)
    first_name = selection[0] if isinstance(selection, list) else options.adapter_name
    first = take_snapshot(model, layout, dataclasses.replace(options, adapter_name=first_name), copy=copy)
    snapshots = {first_name: first}
    for name in adapters_to_take(selection, first):
        if name not in snapshots:
            snapshots[name] = take_snapshot(model, layout, dataclasses.replace(options, adapter_name=name), copy=copy)
    return AdapterSnapshots(selection, snapshots, first)


def adapters_to_take(selection: Selection | None, first: Snapshot) -> list[str]:
    """The adapters a rank snapshots, once it has the snapshot of the first (which names the adapters it holds)."""
    if selection is None:
        return []
    return sorted(first.report.adapter_names) if selection == ALL else list(selection)


def _choose(gathered: list[dict[str, Any]], selection: Selection, default: str) -> tuple[list[str], list[str]]:
    """(adapters to export, root first; adapters skipped as disabled). Pure and identical on every rank."""
    known = sorted(set().union(*(g["names"] for g in gathered)))
    tensors = {n: sum(g["counts"].get(n, 0) for g in gathered) for n in known}
    if selection == ALL:
        chosen = [n for n in known if tensors[n]]
        skipped = [n for n in known if not tensors[n]]
        if not chosen:
            if not known:
                return [default], []  # run_export names the problem (no adapters at all)
            raise NoAdaptersError(
                f"every adapter of the model ({', '.join(known)}) is disabled; enable the ones to export "
                "(ModelOpt: modelopt.torch.peft.enable_adapters(model, adapters_to_enable=[...]))"
            )
    else:
        chosen, skipped = list(selection), []
        unknown = [n for n in chosen if n not in tensors]
        if unknown and known:
            raise NoAdaptersError(
                f"no adapter named {', '.join(map(repr, unknown))}; the model has adapters {known}. Pass adapter_names="
            )
        disabled = [n for n in chosen if n in tensors and not tensors[n]]
        if disabled:
            raise NoAdaptersError(
                f"adapter(s) {', '.join(map(repr, disabled))} are disabled on every module (they act on nothing); "
                "enable them first (ModelOpt: modelopt.torch.peft.enable_adapters(model, adapters_to_enable=[...]))"
            )
    root = default if default in chosen else chosen[0]
    ordered = [root] + [n for n in chosen if n != root]
    bad = [n for n in ordered[1:] if n in RESERVED or not is_name(n)]
    if bad:
        raise ExportError(
            f"adapter name(s) {bad} cannot be subdirectory names; expected {RULE}, and none of {sorted(RESERVED)}"
        )
    return ordered, skipped


def _layout_section(names: list[str]) -> str:
    root, others = names[0], names[1:]
    lines = [
        LAYOUT_HEADING,
        "peft's multi-adapter layout: each adapter has its own config and weights.",
        "",
        "| adapter | directory |",
        "| --- | --- |",
        f'| {root} | . (loaded as "default") |',
        *(f"| {n} | {n}/ |" for n in others),
        "",
        "```python",
        "from peft import PeftModel",
        "",
        'model = PeftModel.from_pretrained(base, "<this directory>")',
    ]
    lines += [f'model.load_adapter("<this directory>/{n}", adapter_name="{n}")' for n in others]
    lines += [f'model.set_adapter("{others[0]}")', "```", ""]
    return "\n".join(lines)


def _agreed_names(
    snapshots: AdapterSnapshots, options: ExportOptions, layout: coll.RankLayout, group: Any
) -> list[str]:
    """Collective: the adapters to export, root first, the same on every rank (disabled ones skipped, with a
    warning)."""
    local = {
        "names": sorted(snapshots.first.report.adapter_names),
        "counts": {n: len(s.report.specs) for n, s in snapshots.snapshots.items()},
    }
    gathered = coll.all_gather(local, group)
    coll.agree(snapshots.first.report.error, group)
    names, skipped = _choose(gathered, snapshots.selection, options.adapter_name)
    if skipped and layout.rank == WRITER:
        log.warning(
            "not exporting disabled adapter(s) %s (they act on nothing in the training model); enable them to "
            "export them",
            ", ".join(skipped),
        )
    return names


def run_multi_export(
    snapshots: AdapterSnapshots,
    output_dir: str | os.PathLike,
    options: ExportOptions,
    layout: coll.RankLayout,
    group: Any,
    *,
    finish: Callable[[Path], Path | None],
    source: str,
    extra_files: dict[str, bytes] | None = None,
) -> Path | None:
    """Collective: export every selected adapter into one staging tree, then `finish(staging)` on the writer.

    Returns finish's result on the writer, None elsewhere; a failure anywhere raises the same error on every rank.
    One adapter (`snapshots.selection` None) is written as `export_adapter` writes it.
    """
    if snapshots.selection is None:
        return run_export(
            snapshots.first, output_dir, options, layout, group, finish=finish, source=source, extra_files=extra_files
        )
    names = _agreed_names(snapshots, options, layout, group)
    root_name, others = names[0], names[1:]
    root = run_export(
        snapshots.of(root_name),
        output_dir,
        dataclasses.replace(options, adapter_name=root_name),
        layout,
        group,
        finish=lambda tmp: tmp,
        source=source,
        extra_files=extra_files,
    )
    try:
        for name in others:
            inner = (
                (root / name) if root is not None else Path(output_dir) / name
            )  # the path matters on the writer only
            run_export(
                snapshots.of(name),
                inner,
                dataclasses.replace(options, adapter_name=name, overwrite=False),
                layout,
                group,
                finish=lambda tmp, inner=inner: publish(tmp, inner, overwrite=False),
                source=f"{source} (adapter {name!r})",
            )
    except BaseException:
        if root is not None:
            discard(root)
        raise

    def publish_tree() -> Path | None:
        try:
            if others:
                append_card(root, _layout_section(names))
            return finish(root)
        except BaseException:
            discard(root)
            raise

    return coll.broadcast_outcome(publish_tree, WRITER, group)
