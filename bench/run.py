"""Benchmarks of megatron-peft-export: training stall per save, offline export against checkpoint size, live export
scaling.

    .venv/bin/python bench/run.py            # the full run: ~4 min, ~6 GB of scratch disk and ~7 GB of RAM at most
    .venv/bin/python bench/run.py --quick    # a smoke run (~25 s): small sizes, few repetitions
    .venv/bin/python bench/run.py --only moe # one benchmark alone (here: MoE tensor counts, 48 x 128 and 61 x 256
    experts)
    .venv/bin/python bench/run.py --only moe_offline --shapes 48x128  # the offline export alone, of some shapes

Prints markdown tables and writes them, with every sample, as JSON (bench/results/latest.json, or quick.json
with --quick). Ratios are medians of runs interleaved in this one invocation; absolute times depend on the
machine and on whatever else runs on it, and are printed, not claimed.
"""

from __future__ import annotations

import time

PROCESS_STARTED = time.perf_counter()  # before the imports below (~7 s: torch, megatron, transformers, modelopt)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: bench and tests.support
warnings.filterwarnings("ignore", category=UserWarning)  # megatron/modelopt "not installed / not tested" notices
warnings.filterwarnings("ignore", category=FutureWarning)

import megatron_peft_export.hook  # noqa: E402,F401  (imported before forking: every process starts warm, with the code as it was at the start)
import megatron_peft_export.offline.export  # noqa: E402,F401
import tests.support.tiny_gpt  # noqa: E402,F401
from bench import moe, moe_offline, offline, probe, scaling, stall  # noqa: E402
from bench.common import machine, wide  # noqa: E402
from bench.report import render  # noqa: E402

PLANS = {
    "full": {
        "stall": ({"10MB": 15, "100MB": 9, "1GB": 5},),
        "offline": (5, [1, 10, 100], offline.ADAPTER),
        "offline_many_tensors": (5, [1], offline.MANY_TENSORS),
        "scaling": (3, [1, 2, 4], scaling.ADAPTER),
        "moe": (3, moe.SHAPES),
        "moe_hook": (3, moe.SHAPES),
        "moe_offline": (3, moe.SHAPES),
    },
    "quick": {
        "stall": ({"10MB": 3},),
        "offline": (1, [1, 10], offline.ADAPTER.resized(num_layers=4)),
        "scaling": (1, [1, 2, 4], wide(1)),
        "moe": (1, moe.QUICK_SHAPES),
        "moe_hook": (1, moe.QUICK_SHAPES),
        "moe_offline": (1, moe.QUICK_SHAPES),
    },
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few repetitions: a smoke run")
    parser.add_argument(
        "--only",
        default="stall,offline,offline_many_tensors,scaling,moe",
        help="comma-separated benchmarks to run (default: %(default)s)",
    )
    parser.add_argument(
        "--reps",
        type=int,
        help="repetitions of every benchmark (default: stall 15/9/5 by size, offline 5, scaling 3; quick 3/1/1)",
    )
    parser.add_argument(
        "--live-only", action="store_true", help="moe: the live paths only (not the offline export of each shape)"
    )
    parser.add_argument(
        "--scratch",
        type=Path,
        default=Path(__file__).resolve().parent / ".scratch",
        help="where checkpoints and adapters are written, then removed (default: %(default)s)",
    )
    parser.add_argument(
        "--shapes",
        help="moe, moe_hook, moe_offline: comma-separated shapes of bench/moe.py (spaces as _; default: all)",
    )
    parser.add_argument(
        "--json", type=Path, help="result file (default: bench/results/latest.json, quick.json with --quick)"
    )
    args = parser.parse_args(argv)
    if args.shapes:
        known = [name.replace(" ", "_") for name in {**moe.SHAPES, **moe.QUICK_SHAPES}]
        unknown_shapes = sorted(set(args.shapes.split(",")) - set(known))
        if unknown_shapes:
            parser.error(f"--shapes: unknown {', '.join(unknown_shapes)}; expected some of {', '.join(known)}")
    mode = "quick" if args.quick else "full"
    plan = PLANS[mode]
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(only) - set(PLANS["full"]))
    if unknown:
        parser.error(f"--only: unknown benchmark(s) {', '.join(unknown)}; expected some of {', '.join(plan)}")
    out_json = args.json or Path(__file__).resolve().parent / "results" / (
        "quick.json" if args.quick else "latest.json"
    )

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", flush=True)

    started = time.perf_counter()
    scratch = args.scratch
    scratch.mkdir(parents=True, exist_ok=True)
    result = {
        "mode": mode,
        "command": " ".join(["python bench/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine(),
    }
    try:
        result["machine"].update(probe.run(scratch, small=args.quick))
        log("machine: " + ", ".join(f"{k} {v}" for k, v in result["machine"].items()))
        if "stall" in only:
            (reps_per_size,) = plan["stall"]  # more repetitions where a save takes milliseconds and noise weighs most
            result["stall"] = stall.run({size: args.reps or reps for size, reps in reps_per_size.items()}, scratch, log)
        for name in ("offline", "offline_many_tensors"):
            if name in only and name in plan:
                reps, ratios, adapter = plan[name]
                result[name] = offline.run(args.reps or reps, ratios, scratch, log, adapter=adapter)
        if "scaling" in only:
            reps, worlds, adapter = plan["scaling"]
            result["scaling"] = scaling.run(args.reps or reps, worlds, scratch, log, geometry=adapter)
        if "moe" in only:
            reps, shapes = plan["moe"]
            shapes = moe.select(shapes, args.shapes)
            result["moe"] = moe.run(
                args.reps or reps,
                scratch,
                log,
                shapes=shapes,
                offline=None if args.live_only else moe_offline.run_shape,
            )
        if "moe_hook" in only:
            reps, shapes = plan["moe_hook"]
            result["moe_hook"] = moe.run(
                args.reps or reps, scratch, log, shapes=moe.select(shapes, args.shapes), hook_only=True
            )
        if "moe_offline" in only:
            reps, shapes = plan["moe_offline"]
            result["moe_offline"] = moe_offline.run(args.reps or reps, scratch, log, moe.select(shapes, args.shapes))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result["seconds"] = time.perf_counter() - PROCESS_STARTED
    result["load_average_at_end"] = os.getloadavg()[0]
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=1) + "\n")
    print()
    print(render(result))
    print(f"\nwrote {out_json} ({result['seconds']:.0f} s in total, imports included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
