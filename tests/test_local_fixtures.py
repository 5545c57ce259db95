"""Builders for local-delivery tests: a qmail root with users/assign, homes,
.qmail files, Maildirs, and a vpopmail-style domain tree — all real files in
tmp_path. (Helpers only; the checks on the builders themselves are below.)"""
from __future__ import annotations

import os
from pathlib import Path

from engine.delivery.local import LocalConfig, deliver_one
from engine.delivery.local.accounts import DeliveryAccounts


def accounts_at(root: Path) -> DeliveryAccounts:
    """Accounts that look at their files on every lookup (tests rewrite them)."""
    return DeliveryAccounts.at(root, recheck_seconds=0)

# Deliveries run as the test process; the assignment's uid must not be 0
# (qmail-lspawn refuses root), so a root test run records 89 instead.
UID = os.getuid() or 89
GID = os.getgid() or 89

MSG = (b"Received: from x by y; 3 Dec 2026 22:00:00 -0000\r\n"
       b"Subject: hi\r\n"
       b"\r\n"
       b"From the start\r\n"
       b">From quoted\r\n"
       b"body\r\n")
MSG_LF = MSG.replace(b"\r\n", b"\n")


def make_maildir(path: Path) -> Path:
    for sub in ("cur", "new", "tmp"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    return path


def make_home(path: Path, mode: int = 0o700) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(mode)
    return path


def write_qmail(home: Path, name: str, text: str, mode: int = 0o600) -> Path:
    p = home / name
    p.write_text(text)
    p.chmod(mode)
    return p


def write_assign(root: Path, lines: list[str]) -> None:
    (root / "users").mkdir(parents=True, exist_ok=True)
    (root / "users" / "assign").write_text("".join(l + "\n" for l in lines) + ".\n")


def new_messages(maildir: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted((maildir / "new").iterdir())]


def config(**kw) -> LocalConfig:
    kw.setdefault("getpw", None)
    kw.setdefault("hostname", "mx.test")
    return LocalConfig(**kw)


class Tree:
    """A qmail root plus helpers to deliver into it."""

    def __init__(self, root: Path, **cfg) -> None:
        self.root = root
        self.config = config(**cfg)
        self.accounts = accounts_at(root)

    def deliver(self, recipient: str, sender: str = "joe@sender.example", message: bytes = MSG):
        return deliver_one(self.config, self.accounts, sender, recipient, message)


def vpop_tree(tmp_path: Path, domain: str = "example.com") -> tuple[Tree, Path]:
    """VP/domains/DOM with `.qmail-default` → vdelivermail, an assign line of
    vadddomain's shape, and a vpasswd with postmaster and joe."""
    vp = tmp_path / "vpopmail"
    ddir = make_home(vp / "domains" / domain, 0o750)
    (vp / "bin").mkdir(parents=True, exist_ok=True)
    write_qmail(ddir, ".qmail-default", f"| {vp}/bin/vdelivermail '' bounce-no-mailbox\n")
    root = tmp_path / "qmail"
    write_assign(root, [f"+{domain}-:{domain}:{UID}:{GID}:{ddir}:-::"])
    users = []
    for name in ("postmaster", "joe"):
        udir = make_home(ddir / name, 0o700)
        make_maildir(udir / "Maildir")
        users.append(f"{name}:$1$abcdefgh$xxxxxxxxxxxxxxxxxxxxxx:1:0:{name}:{udir}:NOQUOTA")
    (ddir / "vpasswd").write_text("".join(u + "\n" for u in users))
    return Tree(root), ddir


def test_vpop_tree_shape(tmp_path):
    tree, ddir = vpop_tree(tmp_path)
    a = tree.accounts.assignment("example.com-joe")
    assert (a.user, a.home, a.dash, a.ext) == ("example.com", str(ddir), "-", "joe")
    assert tree.accounts.vpop_user(str(ddir), "JOE").directory == str(ddir / "joe")
