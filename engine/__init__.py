"""qrelay: a mail transfer agent that reads a qmail box's own files.

Importing the package checks that the compiled SMTP core is present: the
byte-level parsing is only ever done in C, never by a slow Python fallback.
"""
__version__ = "0.1.0"

try:
    from engine import _smtpcore  # noqa: F401  (compiled from cext/smtpcore.pyx)
except ImportError as exc:  # pragma: no cover - exercised by tests in a subprocess
    raise ImportError(
        "qrelay's compiled SMTP core (engine._smtpcore) is missing or broken: "
        f"{exc}. Build it with `pip install -e .` (or `python setup.py build_ext --inplace`) "
        "from the qrelay checkout; `./dev setup` does both."
    ) from exc
