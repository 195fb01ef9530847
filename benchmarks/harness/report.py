"""The report: one Markdown row per run, issue 5's targets, and the files written."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from harness.capacity import latency, latency_p99, noise
from harness.config import NOISY_PCT

TABLE_HEAD = (
    "| scenario | server | CxS | TTFC p50 / p99 ms | chunk latency p50 / p99 / max ms"
    " | chunks/s | server CPU ms/chunk | PostgreSQL CPU ms/chunk | chunks per commit"
    " | RSS KiB/stream | failed streams | lost / dup / mismatched | upstream lag p99 ms"
    " | server CPU: others / steal % |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)

Row = tuple[str, str, str, str, str]  # target, ceiling, sse-llm, ratio or difference, holds


def fmt(value: float | None, digits: int = 1) -> str:
    """A figure for the table: "-" when absent, "∞" when unbounded."""
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return f"{value:,.{digits}f}"


def row(result: dict[str, Any]) -> str:
    """One run as a row of TABLE_HEAD."""
    ttfc = result["ttfc_ms"]
    lat = latency(result)
    verification = result.get("verification")
    integrity = (
        f"{verification['lost']} / {verification['duplicated']} / {verification['mismatched']}"
        if verification
        else "n/a"
    )
    chunks_per_second = result.get("steady_chunks_per_second") or result["chunks_per_second"]
    refused = f" ({result['streams_refused']} refused)" if result.get("streams_refused") else ""
    return (
        f"| {result['scenario']} | {result['server']} | {result['concurrency']}x{result['streams']}"
        f" | {fmt(ttfc['p50'])} / {fmt(ttfc['p99'])}"
        f" | {fmt(lat['p50'])} / {fmt(lat['p99'])} / {fmt(lat['max'])}"
        f" | {fmt(chunks_per_second, 0)}"
        f" | {fmt(result['server_cpu_ms_per_chunk'], 3)}"
        f" | {fmt(result['database_cpu_ms_per_chunk'], 3)}"
        f" | {fmt(result.get('chunks_per_batch'), 1)}"
        f" | {fmt(result['rss_kib_per_stream'], 1)}"
        f" | {result['streams_failed']}{refused}"
        f" | {integrity}"
        f" | {fmt(result['upstream']['lag_ms_p99'])}"
        f" | {fmt(result.get('server_cpu_busy_by_others_pct'), 0)} / "
        f"{fmt(result.get('server_cpu_steal_pct'), 0)} |"
    )


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing, unbounded or b is 0."""
    if a is None or b is None or b == 0 or math.isinf(a) or math.isinf(b):
        return None
    return a / b


def noise_note(*results: dict[str, Any]) -> str:
    """A warning for a latency comparison made while others used the server's CPU."""
    shares = [noise(result) for result in results]
    if max(shares) <= NOISY_PCT:
        return ""
    return " (noisy: others took " + " / ".join(f"{share:.0f}%" for share in shares) + ")"


def targets(report: dict[str, Any]) -> list[Row]:
    """(target, ceiling, sse-llm, ratio/difference, holds) rows for issue 5's targets."""
    scenarios = report["scenarios"]
    rows: list[Row] = []
    ceiling, sse = scenarios.get("C=1", {}).get("ceiling"), scenarios.get("C=1", {}).get("sse-llm")
    if ceiling and sse:
        c, s = latency_p99(ceiling), latency_p99(sse)
        rows.append(
            (
                "C=1 p99 chunk latency ≤ ceiling + 3 ms",
                f"{fmt(c)} ms",
                f"{fmt(s)} ms",
                f"+{fmt(s - c)} ms",
                ("yes" if s <= c + 3 else "NO") + noise_note(ceiling, sse),
            )
        )
    for name in ("C=100", "C=1000"):
        ceiling, sse = (
            scenarios.get(name, {}).get("ceiling"),
            scenarios.get(name, {}).get("sse-llm"),
        )
        if ceiling and sse:
            rows += scenario_rows(name, ceiling, sse)
    capacity = report.get("capacity", {})
    if "ceiling" in capacity and "sse-llm" in capacity:
        c, s = capacity["ceiling"]["streams"], capacity["sse-llm"]["streams"]
        r = ratio(s, c)
        rows.append(
            (
                "capacity (p99 < 100 ms) ≥ 0.7x ceiling",
                f"C={c}",
                f"C={s}",
                f"{fmt(r, 2)}x",
                "yes" if r is not None and r >= 0.7 else "NO",
            )
        )
    return rows


def scenario_rows(name: str, ceiling: dict[str, Any], sse: dict[str, Any]) -> list[Row]:
    """Latency, CPU, integrity and memory targets of one scenario run on both servers."""
    c, s = latency_p99(ceiling), latency_p99(sse)
    r = ratio(s, c)
    latency_row = (
        f"{name} p99 chunk latency ≤ 2x ceiling",
        f"{fmt(c)} ms",
        f"{fmt(s)} ms",
        f"{fmt(r, 2)}x",
        ("yes" if r is not None and r <= 2 else "NO") + noise_note(ceiling, sse),
    )
    c, s = ceiling["server_cpu_ms_per_chunk"], sse["server_cpu_ms_per_chunk"]
    r = ratio(s, c)
    cpu_row = (
        f"{name} server CPU per chunk ≤ 1.5x ceiling",
        f"{fmt(c, 3)} ms",
        f"{fmt(s, 3)} ms",
        f"{fmt(r, 2)}x",
        "yes" if r is not None and r <= 1.5 else "NO",
    )
    v = sse.get("verification") or {}
    lost = [
        v.get(key, 0)
        for key in ("lost", "duplicated", "mismatched", "not_found", "done_but_not_completed")
    ]
    integrity_row = (
        f"{name} every stored answer = what its client got",
        "n/a",
        "lost {} / dup {} / mismatched {} / missing {} / done but not `completed` {}".format(*lost),
        "",
        "yes" if not any(lost) and sse["streams_failed"] == 0 else "NO",
    )
    memory_row = (
        f"{name} memory ≤ 64 KiB per open stream",
        f"{fmt(ceiling['rss_kib_per_stream'])} KiB",
        f"{fmt(sse['rss_kib_per_stream'])} KiB",
        "",
        "yes" if sse["rss_kib_per_stream"] <= 64 else "NO",
    )
    return [latency_row, cpu_row, integrity_row, memory_row]


def _fsync_text(fsync: dict[str, Any]) -> str:
    text = f"8 kB write + fdatasync p50 / p99 / max {fsync['p50']} / {fsync['p99']} / "
    text += f"{fsync.get('max', '?')} ms"
    if "over_50_ms" in fsync:
        text += f", {fsync['over_50_ms']} stalls over 50 ms in {fsync['seconds']:g} s"
    return text


def header(report: dict[str, Any]) -> list[str]:
    """The report's title and where, on what and how it was measured."""
    machine = report["machine"]
    return [
        f"# sse-llm benchmark — {report['started']}",
        "",
        f"Machine: {machine['cpu']}, {machine['cpus']} CPUs, "
        f"load average before {machine['load_before']}, after "
        f"{machine['load_after']}; sse-llm's database in "
        f"{machine.get('data_root', '?')}, where an "
        f"{_fsync_text(machine['fsync_ms'])}. "
        f"Python {machine['python']}. "
        f"sse-llm at {report['git']}. Ceiling client: {report['ceiling_client']}. "
        f"Pinning: {report['pinning']}. Each stream: {report['chunks']} chunks every "
        f"{report['interval_ms']:g} ms.",
        "",
        "Latency = client read time - upstream emission time, measured at full concurrency"
        " (≥ 90% of C streams open); TTFC = connect → first chunk (the upstream's first chunk"
        f" comes {report['interval_ms']:g} ms after the request). CPU = server processes' CPU"
        " over the run / chunks delivered.",
        "",
        TABLE_HEAD,
    ]


def markdown(report: dict[str, Any]) -> str:
    """The whole report as Markdown: every run, the capacity, the targets, the profiles."""
    lines = header(report)
    for result in report["runs"]:
        lines.append(row(result))
    capacity = report.get("capacity", {})
    if capacity:
        lines += [
            "",
            "Capacity (largest C with p99 < 100 ms, no failed stream, nothing lost, "
            "at least 90% of the offered chunks/s delivered): "
            + ", ".join(f"{name} C={found['streams']}" for name, found in capacity.items()),
        ]
    rows = targets(report)
    if rows:
        lines += [
            "",
            "## sse-llm / ceiling against issue 5's targets",
            "",
            "| target | ceiling | sse-llm | ratio | holds |",
            "|---|---|---|---|---|",
            *(f"| {' | '.join(r)} |" for r in rows),
        ]
    if report.get("profiles"):
        lines += ["", "## Profiles (py-spy, sse-llm)", ""]
        for profile in report["profiles"]:
            lines += [profile["markdown"], ""]
    return "\n".join(lines) + "\n"


def write(report: dict[str, Any], text: str, paths: list[Path]) -> None:
    """The report as JSON at each .json path, its Markdown at each .md path."""
    for path in paths:
        if path.suffix == ".md":
            path.write_text(text)
        else:
            path.write_text(json.dumps(report, indent=2, default=str))
