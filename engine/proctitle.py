"""Process titles for `ps` (`qrelay: receiver 0`, `qrelay: scheduler`).

Every process of `qrelay run` is a fork of one Python program, so without a
title they all look the same in `ps` and `top`. setproctitle rewrites the
command line the kernel shows; when it is not installed nothing changes —
never an error.
"""
from __future__ import annotations


def set_title(title: str) -> None:
    """Set this process's title as `ps` shows it; never raises."""
    try:
        import setproctitle
    except ImportError:
        return
    try:
        setproctitle.setproctitle(title)
    except Exception:  # a title is cosmetic: never let it stop a service
        pass
