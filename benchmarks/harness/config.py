"""What one benchmark run was asked to do, and the paths and bounds every part shares."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent  # benchmarks/
REPO = HERE.parent
RESULTS = HERE / "results"
PYTHON = sys.executable
LATENCY_TARGET_MS = 100.0  # the capacity search's p99 bound
NOISY_PCT = 15.0  # a scenario run this disturbed (others, steal) is not reused as a probe


@dataclass(frozen=True)
class Config:
    """The command line's choices, read once and passed to every part of the run."""

    quick: bool
    scenarios: str
    only: str | None
    no_capacity: bool
    chunks: int
    interval_ms: float
    workers: int
    max_streams: int
    max_capacity: int
    max_seconds: float
    ceiling_client: str
    profile: str
    profile_only: bool
    data_root: str | None
    keep: bool
    nice: int
    json: str | None
    sse_llm_checkout: Path

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Config:
        """The `Config` of parsed `run.py` arguments."""
        checkout = Path(args.sse_llm_checkout).resolve() if args.sse_llm_checkout else REPO
        return cls(
            quick=args.quick,
            scenarios=args.scenarios,
            only=args.only,
            no_capacity=args.no_capacity,
            chunks=args.chunks,
            interval_ms=args.interval_ms,
            workers=args.workers,
            max_streams=args.max_streams,
            max_capacity=args.max_capacity,
            max_seconds=args.max_seconds,
            ceiling_client=args.ceiling_client,
            profile=args.profile,
            profile_only=args.profile_only,
            data_root=args.data_root,
            keep=args.keep,
            nice=args.nice,
            json=args.json,
            sse_llm_checkout=checkout,
        )

    @property
    def sse_llm_python(self) -> str:
        """The interpreter that serves sse-llm: the checkout's own .venv when it is not ours."""
        if self.sse_llm_checkout == REPO:
            return PYTHON
        return str(self.sse_llm_checkout / ".venv" / "bin" / "python")

    def scenario_plan(self) -> list[tuple[str, int, int]]:
        """(name, C, S) of each scenario run, in order."""
        if self.scenarios:  # "200x600,400x800": C x S each
            plan = []
            for item in self.scenarios.split(","):
                concurrency, _, streams = item.strip().partition("x")
                count = int(streams) if streams else 3 * int(concurrency)
                plan.append((f"C={concurrency}", int(concurrency), count))
            return plan
        if self.quick:  # C=1000 alone would take a minute against a saturated server
            return [("C=1", 1, 3), ("C=100", 100, 200)]
        return [("C=1", 1, 10), ("C=100", 100, 300), ("C=1000", 1000, 2000)]
