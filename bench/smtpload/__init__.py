"""Shared code of the bench tools (flood.py, sink.py, bench_relay_e2e.py, ...).

Owns: the latency histogram, HOST:PORT parsing, message building, the SMTP
client engine behind flood.py, the SMTP server engine behind sink.py,
and waiting for / stopping their child processes (process.py).
Must never import `engine`: the tools load-test any server, not only qrelay.
"""
