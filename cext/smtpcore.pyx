# cython: language_level=3
"""Byte-level SMTP core (placeholder until the core lands; see issue 2)."""
