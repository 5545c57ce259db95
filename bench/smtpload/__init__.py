"""Shared code of the bench tools (flood.py, sink.py, relay.py).

Owns: the latency histogram, HOST:PORT parsing, message building, the SMTP
client engine behind flood.py and the SMTP server engine behind sink.py.
Must never import `engine`: the tools load-test any server, not only qrelay.
"""
