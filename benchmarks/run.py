"""One command for the whole benchmark: `python benchmarks/run.py [--quick]`.

It starts the fake upstream (upstream.py), sse-llm (`sse-llm serve`, `openai` provider
pointed at the upstream, a fresh embedded PostgreSQL in a temporary folder) and the
ceiling (ceiling.py, a bare Starlette passthrough with no database), pins the server
under test to CPU 0 and everything else (upstream, load generator, PostgreSQL, this
script) to CPU 1, then drives both servers with the same load (load.py, a separate
process) in the same scenarios, one server at a time:

- every stream is K=50 chunks, one every T=50 ms;
- C = 1, 100 and 1,000 concurrent streams;
- a capacity search: the largest C at which p99 per-chunk latency stays under 100 ms.

For each run it records what load.py measures (time to first chunk, per-chunk latency,
chunks/s, protocol checks and, for sse-llm, the comparison of every stored response
with what its client received), plus the server's CPU seconds (psutil, every process of
the server: uvicorn workers included, PostgreSQL counted apart) and its RSS per open
stream (peak RSS during the run minus RSS when idle, over C). It prints a Markdown
table and the sse-llm / ceiling ratios against the targets of issue 5, and writes
benchmarks/results/<timestamp>.json and .md (plus latest.json / latest.md).

    python benchmarks/run.py --quick          # a subset, under 2 minutes
    python benchmarks/run.py                  # the full run, about 5-10 minutes
    python benchmarks/run.py --profile 300,1000   # also py-spy sse-llm at these C

The parts live in benchmarks/harness/ (see its __init__); this file is the command line.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from harness import report as reporting
from harness.capacity import capacity_search
from harness.config import RESULTS, Config
from harness.machine import cpu_model, fsync_ms, git_describe
from harness.measure import run_load, warm_up
from harness.processes import Bench, cpu_sets
from harness.profiling import profile


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """run.py's options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--quick", action="store_true", help="a small subset, under 2 minutes")
    add("--scenarios", default="", help='instead of the standard ones, e.g. "200x600,400x800"')
    add("--only", choices=("ceiling", "sse-llm"), help="run one server only")
    add("--no-capacity", action="store_true", help="skip the capacity search")
    add("--chunks", type=int, default=50, help="chunks per stream (K)")
    add("--interval-ms", type=float, default=50, help="ms between chunks (T)")
    add("--workers", type=int, default=1, help="sse-llm serve --workers N")
    add("--max-streams", type=int, default=20_000, help="SSE_LLM_MAX_STREAMS")
    add("--max-capacity", type=int, default=4000, help="capacity search cap")
    add("--max-seconds", type=float, default=90, help="per load run: start no stream after")
    add("--ceiling-client", default="aiohttp", choices=("aiohttp", "httpx-aiohttp", "httpx"))
    add("--profile", default="", help="comma-separated C values to py-spy sse-llm at")
    add("--profile-only", action="store_true", help="only the --profile runs")
    add(
        "--data-root",
        help="folder for the run's files, sse-llm's PostgreSQL included (default: the system's "
        "temporary folder); /dev/shm takes the disk and its fsync out of the measurement",
    )
    add("--keep", action="store_true", help="keep the temporary folder (logs, data)")
    add(
        "--nice",
        type=int,
        default=0,
        help="run every benchmark process at this niceness (e.g. -5 as root, so a shared "
        "machine's other work disturbs the measurement less)",
    )
    add("--json", metavar="PATH", help="also write the report's JSON here (for ab.py)")
    add(
        "--sse-llm-checkout",
        metavar="DIR",
        help="serve sse-llm from this project checkout, with its own .venv/bin/python "
        "(default: this one, with this Python); the upstream, ceiling and load stay ours",
    )
    return parser.parse_args(argv)


def new_report(bench: Bench, started: datetime) -> dict[str, Any]:
    """The report before any run: the settings, the code measured and the machine."""
    config = bench.config
    server_cpus, other_cpus = bench.server_cpus, bench.other_cpus
    pinning = (
        f"servers on CPU {sorted(server_cpus)}, the rest on CPU {sorted(other_cpus)}"
        if server_cpus and other_cpus
        else "none (one CPU)"
    )
    return {
        "started": started.isoformat(timespec="seconds"),
        "quick": config.quick,
        "chunks": config.chunks,
        "interval_ms": config.interval_ms,
        "workers": config.workers,
        "ceiling_client": config.ceiling_client,
        "git": git_describe(config.sse_llm_checkout),
        "pinning": pinning + (f", niceness {config.nice}" if config.nice else ""),
        "machine": {
            "cpu": cpu_model(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_before": [round(x, 2) for x in os.getloadavg()],
            "data_root": str(bench.workdir.parent),
            "fsync_ms": fsync_ms(bench.workdir),
        },
        "scenarios": {},
        "runs": [],
        "capacity": {},
        "profiles": [],
    }


def log(message: str) -> None:
    """Progress, as it happens."""
    print(message, flush=True)


def run_scenarios(bench: Bench, names: list[str], report: dict[str, Any]) -> None:
    """Every scenario on every server (interleaved), then each server's capacity search."""
    config = bench.config
    for scenario, concurrency, streams in config.scenario_plan():
        for name in names:  # interleaved: a noisy neighbour hits both alike
            log(f"{scenario}: {name}, {concurrency}x{streams} ...")
            result = run_load(bench, bench.servers[name], concurrency, streams)
            result["scenario"] = scenario
            report["runs"].append(result)
            report["scenarios"].setdefault(scenario, {})[name] = result
            log(reporting.row(result))
    if config.no_capacity:
        return
    for name in names:
        known = {r["concurrency"]: r for r in report["runs"] if r["server"] == name}
        ratio = 2.0 if config.quick else 1.15
        found, probes = capacity_search(bench, bench.servers[name], known, ratio, log)
        report["runs"] += probes
        report["capacity"][name] = {"streams": found}
        log(f"capacity of {name}: C={found}")


def run_all(bench: Bench, names: list[str], report: dict[str, Any]) -> None:
    """Start the processes, warm the servers up, run the scenarios and the profiles."""
    config = bench.config
    log(f"starting upstream, {', '.join(names)} (logs in {bench.logs})")
    bench.start_upstream()
    if "ceiling" in names:
        bench.start_ceiling()
    if "sse-llm" in names or config.profile:
        bench.start_sse_llm()
    for server in bench.servers.values():
        warm_up(bench, server)
    if not config.profile_only:
        run_scenarios(bench, names, report)
    for concurrency in [int(c) for c in config.profile.split(",") if c.strip()]:
        log(f"profiling sse-llm at C={concurrency} ...")
        found = profile(bench, concurrency, log)
        report["runs"].append(found["run"])
        report["profiles"].append(found)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print and write its report."""
    config = Config.from_args(parse_args(argv))
    RESULTS.mkdir(exist_ok=True)
    started = datetime.now(UTC)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    workdir = Path(tempfile.mkdtemp(prefix="sse-llm-bench-", dir=config.data_root))
    logs = RESULTS / f"logs-{stamp}"
    logs.mkdir()
    server_cpus, other_cpus = cpu_sets()
    if other_cpus:
        os.sched_setaffinity(0, other_cpus)
    bench = Bench(config, workdir, logs, server_cpus, other_cpus)
    report = new_report(bench, started)
    names = [config.only] if config.only else ["ceiling", "sse-llm"]
    try:
        run_all(bench, names, report)
    except KeyboardInterrupt:
        log("interrupted: stopping the servers and writing what was measured")
        report["interrupted"] = True
    finally:
        bench.stop_all()
        report["machine"]["load_after"] = [round(x, 2) for x in os.getloadavg()]
        if not config.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    text = reporting.markdown(report)
    paths = [RESULTS / f"{stamp}.{kind}" for kind in ("json", "md")]
    paths += [RESULTS / "latest.json", RESULTS / "latest.md"]
    reporting.write(report, text, paths + ([Path(config.json)] if config.json else []))
    print()
    print(text)
    print(f"written: {RESULTS / (stamp + '.json')}, {RESULTS / (stamp + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
