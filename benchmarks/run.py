"""`make bench`: run edged's benchmarks and print one table of figures against their goals.

    python benchmarks/run.py [--quick] [--only NAME[,NAME...]] [--json PATH]

--quick runs every benchmark on a token budget (seconds in all): for the smoke test, not for
figures. The default budget keeps the whole run within about five minutes on two cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import bandwidth, idle, imu_fifo, ingest, memory, pipeline, stages, storage, updates  # noqa: E402
from benchmarks.common import Figure, machine  # noqa: E402

# In the order of issue 8.
BENCHMARKS = {
    "efficiency": pipeline.efficiency,
    "latency": pipeline.latency,
    "memory": memory.memory,
    "outbox": storage.outbox,
    "bandwidth": bandwidth.bandwidth,
    "imu": imu_fifo.imu_fifo,
    "idle": idle.idle,
    "ingest": ingest.ingest,  # issue 12: the cloud half at fleet scale
    "stages": stages.stages,  # issue 14: a chain of vision stages, per stage and per crop
    "updates": updates.updates,  # issue 13: what the model updater costs, how fast a rollout spreads
}


def run(names: list[str], quick: bool, log=sys.stderr) -> tuple[list[Figure], list[str]]:
    """Run the named benchmarks; returns (figures, failures). A benchmark that raises is
    reported as a failure line and the others still run."""
    figures: list[Figure] = []
    failures: list[str] = []
    for name in names:
        t0 = time.monotonic()
        print(f"bench: {name} ...", file=log, flush=True)
        try:
            figs = BENCHMARKS[name](quick=quick)
        except Exception as exc:  # one broken benchmark must not hide the others' figures
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
            traceback.print_exc(file=log)
            continue
        figures.extend(figs)
        print(f"bench: {name} done in {time.monotonic() - t0:.0f} s", file=log, flush=True)
    return figures, failures


def _decimals(value: float) -> int:
    v = abs(value)
    return 0 if v >= 100 or float(value).is_integer() else 1 if v >= 10 else 2


def table(figures: list[Figure]) -> str:
    rows = [("benchmark", "figure", "value", "goal", "")]
    for f in figures:
        if f.unit == "×":
            value = f"{f.value:.3f}" if f.value < 10 else f"{f.value:,.0f} ×"
        else:
            value = f"{f.value:,.{_decimals(f.value)}f} {f.unit}".strip()
        mark = {True: "ok", False: "MISS", None: ""}[f.ok]
        rows.append((f.bench, f.name, value, f.goal, mark))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks/run.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="token budget: checks that everything runs")
    ap.add_argument("--only", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    ap.add_argument("--json", metavar="PATH", help="also write the machine and figures as JSON")
    ap.add_argument("--notes", action="store_true", help="print each figure's note under the table")
    args = ap.parse_args(argv)
    names = list(BENCHMARKS)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in BENCHMARKS]
        if unknown:
            ap.error(f"unknown benchmark {', '.join(unknown)} (known: {', '.join(BENCHMARKS)})")
    info = machine()
    figures, failures = run(names, args.quick)
    print(f"edged benchmarks on {info['cpu']}, {info['cores']} cores, Python {info['python']}, "
          f"{info['runtime']}, numpy {info['numpy']}{' (quick budget)' if args.quick else ''}")
    print(table(figures))
    if args.notes:
        for f in figures:
            if f.note:
                print(f"- {f.bench} / {f.name}: {f.note}")
    for line in failures:
        print(f"FAILED {line}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "quick": args.quick,
                                               "figures": [f.as_dict() for f in figures],
                                               "failures": failures}, indent=1) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
