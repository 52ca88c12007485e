#!/usr/bin/env python3
"""Checks issue 4's targets on the JSON reports `scripts/bench` writes to docs/bench/targets.

    bench-targets.py --half-peak FILE...   prints half of walletq's median throughput (req/s)
    bench-targets.py DIR                    prints the targets table (markdown) from DIR/*.json

Each case has three peak runs (<case>-1.json … -3.json) and one run at half of walletq's
median peak (<case>-half.json). Ratios are taken within a run, then the median of the three.
"""

import json
import statistics
import sys
from pathlib import Path


def runs(path):
    """approach -> its run, from one JSON report."""
    report = json.loads(Path(path).read_text())
    return {r["approach"]: r for r in report["runs"]}


def median(values):
    return statistics.median(values) if values else float("nan")


def half_peak(files):
    peaks = [runs(f)["walletq"]["throughput_rps"] for f in files]
    return int(median(peaks) / 2)


def verdict(ok):
    return "**yes**" if ok else "**no**"


def half_peak_row(case, half):
    """The latency target's row, from the run at half of the peak rate."""
    w, e = half["walletq"], half["broker-echo"]
    return (
        f"{case}: p99 ≤ 50 ms at half the peak ({w['rate']:,.0f} req/s)",
        f"{w['latency']['p99_ms']:.1f} ms (p50 {w['latency']['p50_ms']:.1f}; echo p99 {e['latency']['p99_ms']:.1f} ms)",
        verdict(w["latency"]["p99_ms"] <= 50),
    )


def main(directory):
    directory = Path(directory)
    rows = []

    def case(name):
        peak = [runs(directory / f"{name}-{i}.json") for i in (1, 2, 3)]
        half_file = directory / f"{name}-half.json"
        half = runs(half_file) if half_file.exists() else None
        return peak, half

    for name, label in (("spread-p16", "16 partitions (default)"), ("spread-p4", "4 partitions")):
        peak, half = case(name)
        ratios = [r["walletq"]["throughput_rps"] / r["broker-echo"]["throughput_rps"] for r in peak]
        walletq = [r["walletq"]["throughput_rps"] for r in peak]
        echo = [r["broker-echo"]["throughput_rps"] for r in peak]
        spread = ", ".join(f"{x:.2f}" for x in ratios)
        rows.append((
            f"spread, {label}: walletq ≥ 0.8 × broker echo",
            f"{median(ratios):.2f} (runs: {spread}; walletq {median(walletq):,.0f}, echo {median(echo):,.0f} req/s)",
            verdict(median(ratios) >= 0.8),
        ))
        rows.append((
            f"spread, {label}: ≥ 5,000 withdrawals/s",
            f"{median(walletq):,.0f} req/s (runs: {', '.join(f'{x:,.0f}' for x in walletq)})",
            verdict(median(walletq) >= 5000),
        ))
        if half:
            rows.append(half_peak_row(f"spread, {label}", half))

    peak, half = case("hot-p16")
    walletq = median([r["walletq"]["throughput_rps"] for r in peak])
    direct = {a: median([r[a]["throughput_rps"] for r in peak])
              for a in ("redis-lock", "sql-lock-table", "select-for-update", "conditional-update")}
    best = max(direct, key=direct.get)
    rows.append((
        "hot: walletq ≥ 2 × the best of approaches 2–5",
        f"{walletq / direct[best]:.2f} × ({walletq:,.0f} vs {best} {direct[best]:,.0f} req/s)",
        verdict(walletq >= 2 * direct[best]),
    ))
    echo = median([r["broker-echo"]["throughput_rps"] for r in peak])
    rows.append((
        "hot: walletq ≥ 10 × the seed's Redis lock",
        f"{walletq / direct['redis-lock']:.1f} × ({walletq:,.0f} vs {direct['redis-lock']:,.0f} req/s; "
        f"the broker echo alone is {echo / direct['redis-lock']:.1f} ×)",
        verdict(walletq >= 10 * direct["redis-lock"]),
    ))
    if half:
        rows.append(half_peak_row("hot", half))

    print("| target | measured (median of 3 runs) | holds? |")
    print("|--------|-----------------------------|--------|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--half-peak":
        print(half_peak(sys.argv[2:]))
    elif len(sys.argv) == 2:
        main(sys.argv[1])
    else:
        sys.exit(__doc__)
