"""Interleaved A/B: the same run.py scenarios against two checkouts, A B A B ..., medians.

    python benchmarks/ab.py --a /work/wt/base13 --b /work/main              # 3 rounds
    python benchmarks/ab.py --a ../base --b . --rounds 5 -- --data-root /dev/shm
    python benchmarks/ab.py --a ../base --b . --rounds 1 -- --scenarios 1x3 --max-capacity 8

Each run is this checkout's run.py (one harness: the same upstream, load generator and
capacity search for both sides) serving sse-llm from one checkout with that checkout's
own `.venv/bin/python` (`run.py --sse-llm-checkout`). Anything after `--` goes to every
run.py, after `--only sse-llm` unless it says `--only`. Interleaving spreads a shared machine's
drift over both sides alike. Per run it keeps the capacity and, per scenario, the chunk
latency p99, chunks/s, server CPU per chunk and TTFC p50; it prints the median of each
per side and B's change against A, and passes when capacity moved within ±5% and every
scenario's p99 within ±15% (issue 13). Every run's JSON and the summary go to
benchmarks/results/ab-<timestamp>/; the exit status is 1 when a bound does not hold.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from harness.capacity import latency_p99
from harness.config import HERE, PYTHON, RESULTS

CAPACITY_BOUND = 0.05  # issue 13: capacity within ±5%
P99_BOUND = 0.15  # issue 13: p99 within ±15%
SIDES = ("A", "B")


@dataclass(frozen=True)
class Figure:
    """One compared figure: where it is in a run's summary and how far it may move."""

    name: str
    bound: float | None  # None: shown, not judged


FIGURES = (
    Figure("chunk_latency_p99_ms", P99_BOUND),
    Figure("chunks_per_second", None),
    Figure("server_cpu_ms_per_chunk", None),
    Figure("ttfc_p50_ms", None),
)


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """The compared figures of one run.py report: capacity, and per scenario."""
    scenarios = {}
    for name, servers in report["scenarios"].items():
        result = servers.get("sse-llm")
        if result is None:
            continue
        scenarios[name] = {
            "chunk_latency_p99_ms": latency_p99(result),
            "chunks_per_second": result.get("steady_chunks_per_second")
            or result["chunks_per_second"],
            "server_cpu_ms_per_chunk": result["server_cpu_ms_per_chunk"],
            "ttfc_p50_ms": result["ttfc_ms"]["p50"],
        }
    capacity = report.get("capacity", {}).get("sse-llm")
    return {
        "git": report["git"],
        "capacity": capacity["streams"] if capacity else None,
        "scenarios": scenarios,
    }


def run_once(checkout: Path, json_path: Path, run_args: list[str]) -> dict[str, Any]:
    """One run.py against `checkout`'s sse-llm; its summary."""
    command = [PYTHON, str(HERE / "run.py"), "--sse-llm-checkout", str(checkout)]
    command += ["--json", str(json_path), *run_args]
    print(f"$ {' '.join(command)}", flush=True)
    finished = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    (json_path.with_suffix(".log")).write_text(finished.stdout)
    if finished.returncode != 0 or not json_path.exists():
        sys.exit(f"run.py failed ({finished.returncode}):\n{finished.stdout[-3000:]}")
    return summarize(json.loads(json_path.read_text()))


def median(values: list[float | None]) -> float | None:
    """The median of the values present, or None."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def change(a: float | None, b: float | None) -> float | None:
    """B's relative change against A."""
    if a is None or b is None or a == 0:
        return None
    return (b - a) / a


def compare_row(
    label: str, a: float | None, b: float | None, bound: float | None
) -> tuple[str, bool]:
    """One printed line: medians, change and verdict; and whether the bound holds."""
    moved = change(a, b)
    holds = bound is None or (moved is not None and abs(moved) <= bound)
    verdict = "" if bound is None else ("pass" if holds else "FAIL") + f" (±{bound:.0%})"
    shown = "-" if moved is None else f"{moved:+.1%}"
    return f"| {label} | {_fmt(a)} | {_fmt(b)} | {shown} | {verdict} |", holds


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:,.3f}".rstrip("0").rstrip(".")


def compare(runs: dict[str, list[dict[str, Any]]]) -> tuple[list[str], bool]:
    """The medians table of both sides, and whether every bound holds."""
    lines = ["| figure | A median | B median | B vs A | bound |", "|---|---|---|---|---|"]
    line, ok = compare_row(
        "capacity (C)",
        median([r["capacity"] for r in runs["A"]]),
        median([r["capacity"] for r in runs["B"]]),
        CAPACITY_BOUND if runs["A"][0]["capacity"] is not None else None,
    )
    lines.append(line)
    for scenario in runs["A"][0]["scenarios"]:
        for figure in FIGURES:
            a, b = (
                median([r["scenarios"].get(scenario, {}).get(figure.name) for r in runs[side]])
                for side in SIDES
            )
            line, holds = compare_row(f"{scenario} {figure.name}", a, b, figure.bound)
            lines.append(line)
            ok = ok and holds
    return lines, ok


def main() -> int:
    """Run the rounds, print and write the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", required=True, type=Path, help="checkout A (the baseline)")
    parser.add_argument("--b", required=True, type=Path, help="checkout B (the change)")
    parser.add_argument("--rounds", type=int, default=3, help="A B pairs (at least 3 to judge)")
    parser.add_argument("run_args", nargs="*", help="after --: run.py's options")
    args = parser.parse_args()
    run_args = args.run_args if "--only" in args.run_args else ["--only", "sse-llm", *args.run_args]
    checkouts = {"A": args.a.resolve(), "B": args.b.resolve()}
    for side, checkout in checkouts.items():
        if not (checkout / ".venv" / "bin" / "python").exists():
            sys.exit(f"{side}: {checkout} has no .venv/bin/python")
    out = RESULTS / f"ab-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}"
    out.mkdir(parents=True)
    runs: dict[str, list[dict[str, Any]]] = {"A": [], "B": []}
    for round_number in range(1, args.rounds + 1):
        for side in SIDES:  # interleaved: A B A B ...
            print(f"round {round_number}/{args.rounds}: {side} ({checkouts[side]})", flush=True)
            summary = run_once(checkouts[side], out / f"{round_number}-{side}.json", run_args)
            runs[side].append(summary)
            print(json.dumps(summary), flush=True)
    lines, ok = compare(runs)
    heading = [
        f"A = {checkouts['A']} at {runs['A'][0]['git']}, "
        f"B = {checkouts['B']} at {runs['B'][0]['git']}; {args.rounds} interleaved round(s), "
        f"run.py {' '.join(run_args)}",
        "",
    ]
    if args.rounds < 3:
        heading += ["(fewer than 3 rounds: issue 13 asks for at least 3 each)", ""]
    text = "\n".join(heading + lines) + f"\n\n{'within bounds' if ok else 'OUT OF BOUNDS'}\n"
    (out / "summary.json").write_text(json.dumps({"runs": runs, "within_bounds": ok}, indent=2))
    (out / "summary.md").write_text(text)
    print()
    print(text)
    print(f"written: {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
