"""engine.openfiles: the open-files limit qrelay run raises, and the room it leaves."""
from __future__ import annotations

import resource
import subprocess
import sys

from engine import openfiles


def test_raise_soft_limit_takes_the_hard_one():
    # In a child whose soft limit is below its hard one, as a shell's ulimit -Sn leaves it.
    code = ("import resource; from engine import openfiles; "
            "resource.setrlimit(resource.RLIMIT_NOFILE, (64, 300)); "
            "print(openfiles.raise_soft_limit(), resource.getrlimit(resource.RLIMIT_NOFILE))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split(maxsplit=1) == ["300", "(300, 300)\n"]


def test_raise_soft_limit_leaves_an_equal_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        assert openfiles.raise_soft_limit() == soft


def test_room_keeps_descriptors_for_the_process():
    assert openfiles.room(1024) == 1024 - openfiles.RESERVED
    assert openfiles.room(80) == 40                    # a tiny limit keeps half
    assert openfiles.room(resource.RLIM_INFINITY) > 1_000_000


def test_shortfall_says_what_to_raise():
    assert openfiles.shortfall(65536, 1000) is None
    why = openfiles.shortfall(1024, 1000)
    assert why.startswith("open files limit 1024 leaves room for 924 connections per receiver, "
                          "fewer than the 1000 the connection caps allow")
    assert "LimitNOFILE" in why
