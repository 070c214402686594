"""Markdown tables and target verdicts from a result dictionary (the JSON that bench/run.py writes)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

TARGETS = {
    "hook_over_floor": 1.5,
    "sync_over_hook_at_1GB": 10.0,
    "offline_flatness": 1.2,
    "export_over_raw_read": 2.0,
}


def seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"


def size(nbytes: float | None) -> str:
    if nbytes is None:
        return "-"
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.0f} MB"


def _machine(m: dict) -> str:
    return (
        f"{m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM; Linux {m['kernel']}, Python {m['python']}, torch "
        f"{m['torch']}, "
        f"megatron-core {m['megatron_core']}. Measured at the start: disk {m['disk_read_cold_gb_s']} GB/s cold read, "
        f"{m['disk_write_fsync_gb_s']} GB/s write+fsync; host copy {m['host_copy_warm_gb_s']} GB/s into touched "
        f"memory, "
        f"{m['host_copy_fresh_gb_s']} GB/s into fresh pages. Load average {m['load_average_at_start']:.1f} at the start"
    )


def _stall(rows: list[dict]) -> list[str]:
    reps = len(rows[0]["variants"]["hook"]["samples"])
    out = [
        f"### Training stall per save (TP=2 on CPU; median of {reps} interleaved runs; a save's stall is the "
        f"slower rank's)",
        "",
        "| adapter | floor: host copy | hook: `on_checkpoint_saved` | sync: `export_adapter` | hook / floor | sync "
        "/ hook | hook: save to published | hook: first save |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        v = r["variants"]
        out.append(
            f"| {size(r['adapter_bytes'])} | {seconds(v['floor']['seconds'])} | {seconds(v['hook']['seconds'])} | "
            f"{seconds(v['sync']['seconds'])} "
            f"| {r['hook_over_floor']:.2f}x | {r['sync_over_hook']:.1f}x | {seconds(v['hook']['until_published'])} "
            f"| {seconds(r.get('first_hook_save'))} |"
        )
    return out


def _offline(rows: list[dict], many: bool = False) -> list[str]:
    first = rows[0]
    reps = len(first["export"]["samples"])
    what = (
        f"{size(first['adapter_bytes'])} adapter of {first.get('adapter_tensors', '?')} tensors "
        f"(rank {first.get('lora_rank', '?')}, {first.get('layers', '?')} layers; {first.get('stored_items', '?')} "
        f"stored items at TP=2)"
    )
    title = (
        f"### Offline export of one {what} against checkpoint size (cold page cache, a fresh process each; median "
        f"of {reps})"
        if not many
        else f"### Offline export of a {what}: many small tensors (cold page cache; median of {reps})"
    )
    out = [
        title,
        "",
        "| base / adapter | checkpoint on disk | export | of which reading | export peak RSS | full "
        "`dist_checkpointing` load | its peak RSS | raw read of the adapter's bytes | read + write + fsync of them "
        "| export / raw read | export / read+write | export / export at 1x |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        e = r["export"]
        out.append(
            f"| {r['base_bytes'] / r['adapter_bytes']:.0f}x | {size(r['checkpoint_bytes'])} | "
            f"{seconds(e['seconds'])} | {seconds(e['reading_seconds'])} | {size(e['peak_rss'])} "
            f"| {seconds(r['full_load']['seconds'])} | {size(r['full_load']['peak_rss'])} | "
            f"{seconds(r['raw_read']['seconds'])} | {seconds(r['read_write_floor']['seconds'])} "
            f"| {r['export_over_raw_read']:.1f}x | {r['export_over_read_write_floor']:.1f}x | "
            f"{r['export_over_smallest']:.2f}x |"
        )
    return out


def _scaling(rows: list[dict]) -> list[str]:
    out = [
        f"### Live export of one {size(rows[0]['adapter_bytes'])} adapter against world size (TP = processes; "
        f"median of {len(rows[0]['samples'])} exports)",
        "",
        "| processes | `export_adapter` | writer's peak RSS | other ranks' peak RSS (largest) |",
        "| --- | --- | --- | --- |",
    ]
    for r in rows:
        out.append(
            f"| {r['world']} | {seconds(r['seconds'])} | {size(r['writer_peak_rss'])} | "
            f"{size(r['other_ranks_peak_rss'])} |"
        )
    return out


def _moe(result: dict) -> list[str]:
    rows = result["rows"]
    out = [
        f"### MoE tensor counts: ModelOpt LoRA on every routed expert, hidden 8 (one rank; ratios to the floor "
        f"measured in the same process, median of {len(rows[0]['samples']['hook'])})",
        "",
        "| layers x experts | HF tensors | adapter params | `export_adapter` first / write floor | warm per_expert "
        "/ floor | warm fused / its floor | hook first save / copy floor | hook stall / copy floor | write floor | "
        "copy floor |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        w, c = r["floor_write"], r["floor_copy"]
        out.append(
            f"| {r['shape']} | {r['hf_tensors']} | {r['adapter_params']} | {r['export_first'] / w:.2f}x | "
            f"{r['per_expert'] / w:.2f}x | {r['fused'] / r['floor_write_fused']:.2f}x "
            f"| {r['hook_first'] / c:.1f}x ({seconds(r['hook_first'] - c)} above) | {r['hook'] / c:.2f}x | "
            f"{seconds(w)} | {seconds(c)} |"
        )
    out += [
        "",
        "| layers x experts | EP=2 warm per_expert / EP=1 | offline export / read+write floor | offline export "
        "| raw read | read+write floor | offline peak RSS / adapter bytes |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        o = r.get("offline")
        offline = (
            f"{o['export_over_read_write_floor']:.1f}x | {seconds(o['export'])} | {seconds(o['raw_read'])} | "
            f"{seconds(o['read_write_floor'])} | {o['peak_rss_over_adapter_bytes']:.2f}x ({size(o['export_peak_rss'])} "
            f"for {size(o['adapter_bytes'])})"
            if o
            else "- | - | - | - | -"
        )
        out.append(f"| {r['shape']} | {r['ep2_over_ep1']:.2f}x | {offline} |")
    if all("cpu" in r for r in rows):
        out += [
            "",
            "The process's CPU time (`time.process_time`: what the call cost, whatever else ran):",
            "",
            "| layers x experts | warm per_expert / write floor | warm fused / its write floor | per_expert | fused "
            "| write floor |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for r in rows:
            cpu = r["cpu"]
            out.append(
                f"| {r['shape']} | {cpu['per_expert'] / cpu['floor_write']:.2f}x "
                f"| {cpu['fused'] / cpu['floor_write_fused']:.2f}x | {seconds(cpu['per_expert'])} "
                f"| {seconds(cpu['fused'])} | {seconds(cpu['floor_write'])} |"
            )
        if len(rows) >= 2:
            a, b = rows[0], rows[-1]
            span = math.log(b["hf_tensors"] / a["hf_tensors"])
            slopes = {k: math.log(b["cpu"][k] / a["cpu"][k]) / span for k in a["cpu"]}
            out += ["", "CPU-time growth exponent: " + ", ".join(f"{k} {v:.2f}" for k, v in slopes.items())]
    if result.get("growth_exponent"):
        out += [
            "",
            "Growth exponent (log-log slope of time against HF tensors between the two tensor-count sizes): "
            + ", ".join(f"{k} {v:.2f}" for k, v in result["growth_exponent"].items()),
        ]
    return out


def _moe_hook(result: dict) -> list[str]:
    rows = result["rows"]
    out = [
        f"### The hook at MoE tensor counts (one rank; ratios to the copy floor measured in the same process, median "
        f"of {len(rows[0]['samples']['hook'])})",
        "",
        "| layers x experts | adapter params | first save | first save / copy floor | `prepare` (before training) "
        "| first save after it / copy floor | stall / copy floor | copy floor |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        c = r["floor_copy"]
        prepared = (
            f"{seconds(r['prepare'])} | {r['hook_first_prepared'] / c:.2f}x "
            f"({seconds(r['hook_first_prepared'] - c)} above)"
            if "prepare" in r
            else "- | -"
        )
        out.append(
            f"| {r['shape']} | {r['adapter_params']} | {seconds(r['hook_first'])} | {r['hook_first'] / c:.2f}x "
            f"({seconds(r['hook_first'] - c)} above) | {prepared} | {r['hook'] / c:.2f}x | {seconds(c)} |"
        )
    if all("cpu" in r for r in rows):
        out += [
            "",
            "The training thread's CPU time (`time.thread_time`: what the call cost, whatever else ran):",
            "",
            "| layers x experts | first save / copy floor | first save after `prepare` / copy floor "
            "| stall / copy floor | copy floor |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in rows:
            cpu = r["cpu"]
            c = cpu["floor_copy"]
            out.append(
                f"| {r['shape']} | {cpu['hook_first'] / c:.2f}x | {cpu['hook_first_prepared'] / c:.2f}x "
                f"| {cpu['hook'] / c:.2f}x | {seconds(c)} |"
            )
    if result.get("growth_exponent"):
        out += [
            "",
            "Growth exponent (log-log slope of time against adapter params between the two sizes): "
            + ", ".join(f"{k} {v:.2f}" for k, v in result["growth_exponent"].items()),
        ]
    return out


def _moe_offline(result: dict) -> list[str]:
    rows = result["rows"]
    out = [
        f"### Offline export at MoE tensor counts (a fresh process each, page cache evicted; median of "
        f"{len(rows[0]['export_samples'])})",
        "",
        "| layers x experts | stored items | export | raw read | read+write floor | export / read+write floor "
        "| export CPU | read+write floor CPU | peak RSS | peak RSS / adapter bytes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        cpu = (
            f"{seconds(r['export_cpu'])} | {seconds(r['read_write_floor_cpu'])}"
            if "export_cpu" in r
            else "- | -"  # runs before the CPU columns
        )
        out.append(
            f"| {r['shape']} | {r['stored_items']} | {seconds(r['export'])} | {seconds(r['raw_read'])} | "
            f"{seconds(r['read_write_floor'])} | {r['export_over_read_write_floor']:.2f}x | {cpu} | "
            f"{size(r['export_peak_rss'])} | {r['peak_rss_over_adapter_bytes']:.2f}x ({size(r['adapter_bytes'])}) |"
        )
    if result.get("growth_exponent"):
        out += [
            "",
            "Growth exponent (log-log slope against stored items between the first and last hidden-8 shape): "
            + ", ".join(f"{k} {v:.2f}" for k, v in result["growth_exponent"].items()),
        ]
    return out


def verdicts(result: dict) -> list[str]:
    """One line per target of issue 8, with the measured value."""
    out = []
    if "stall" in result:
        worst = max(result["stall"], key=lambda r: r["hook_over_floor"])
        each = ", ".join(f"{size(r['adapter_bytes'])} {r['hook_over_floor']:.2f}x" for r in result["stall"])
        ok = worst["hook_over_floor"] <= TARGETS["hook_over_floor"]
        out.append(f"- hook stall within 1.5x of the floor: {'met' if ok else 'MISSED'} ({each})")
        big = [r for r in result["stall"] if r["size"] == "1GB"]
        if big:
            ratio = big[0]["sync_over_hook"]
            out.append(
                f"- hook stall at least 10x below the synchronous export at 1 GB: "
                f"{'met' if ratio >= TARGETS['sync_over_hook_at_1GB'] else 'MISSED'} ({ratio:.1f}x)"
            )
    if "offline" in result:
        rows = result["offline"]
        times = [r["export"]["seconds"] for r in rows]
        spread = max(times) / min(times)
        out.append(
            f"- offline export flat in base size ({rows[0]['ratio']}x to {rows[-1]['ratio']}x within 1.2x): "
            f"{'met' if spread <= TARGETS['offline_flatness'] else 'MISSED'} (slowest / fastest {spread:.2f}x)"
        )
        every = rows + result.get("offline_many_tensors", [])
        worst = max(r["export_over_raw_read"] for r in every)
        floor = max(r["export_over_read_write_floor"] for r in every)
        out.append(
            f"- offline export throughput at least half of a raw read of the adapter's bytes: "
            f"{'met' if worst <= TARGETS['export_over_raw_read'] else 'MISSED'} (export takes at most {worst:.1f}x "
            f"the raw read, "
            f"{floor:.1f}x reading the bytes and writing them to one fsynced file)"
        )
    return out


def render(result: dict) -> str:
    lines = [
        f"Machine: {_machine(result['machine'])}, {result.get('load_average_at_end', float('nan')):.1f} at the end.",
        "",
    ]
    tables = (
        ("stall", _stall),
        ("offline", _offline),
        ("offline_many_tensors", lambda rows: _offline(rows, many=True)),
        ("scaling", _scaling),
        ("moe", _moe),
        ("moe_hook", _moe_hook),
        ("moe_offline", _moe_offline),
    )
    for key, table in tables:
        if key in result:
            lines += table(result[key]) + [""]
    lines += ["Targets (issue 8):", *verdicts(result)]
    return "\n".join(lines)


if __name__ == "__main__":  # re-render a saved result: python bench/report.py bench/results/latest.json
    print(render(json.loads(Path(sys.argv[1]).read_text())))
