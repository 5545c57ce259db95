"""Prints the figures and target ratios of bench/bench_core.py after a
pytest-benchmark run (best per-call time of each benchmark, same run)."""
from __future__ import annotations


def pytest_terminal_summary(terminalreporter, config):
    try:
        from bench_core import RESULTS, summary_lines
    except ImportError:
        return
    best = config.stash.get(RESULTS, None)
    if not best:
        return
    lines, ok = summary_lines(best)
    terminalreporter.section("smtpcore targets " + ("met" if ok else "MISSED"))
    for line in lines:
        terminalreporter.write_line(line)
