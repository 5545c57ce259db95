"""The account look-ups local delivery needs, read straight from qmail's and
vpopmail's files: users/cdb (else users/assign) and a domain's vpasswd.

This is the smallest stand-in for `engine.accounts` (being written
separately): `FileAccounts` answers `assignment(local)` exactly as
qmail-lspawn's nughde_get() does (spec §3.1–3.3) and `vpop_user(domain_dir,
name)` as vauth_getpw() with the cdb back end (vpopmail spec §2.3). Files are
re-read when their mtime or size changes, so a qmail-newu or vadduser is seen
without a restart; nothing is cached across processes.

It never writes a file.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

from engine.config.cdb import CdbError, CdbFile


class AccountsError(Exception):
    """users/cdb, users/assign or a vpasswd file exists but cannot be read."""


@dataclass(frozen=True, slots=True)
class Assignment:
    user: str
    uid: int
    gid: int
    home: str
    dash: str
    ext: str


@dataclass(frozen=True, slots=True)
class VUser:
    name: str
    crypted: str
    uid: int
    gid: int
    gecos: str
    directory: str
    quota: str
    clear: str = ""

    BOUNCE_MAIL = 0x10

    @property
    def bounce_mail(self) -> bool:
        return bool(self.gid & 0x10)


def _int(text: str) -> int:
    digits = ""
    for ch in text.strip():
        if not ch.isdigit():
            break
        digits += ch
    return int(digits) if digits else 0


def parse_assign(text: str) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """users/assign → (exact, wildcard) maps keyed by lower-cased local/prefix;
    values (user, uid, gid, home, dash, ext). First duplicate wins (cdb)."""
    exact: dict[str, tuple] = {}
    wild: dict[str, tuple] = {}
    for line in text.split("\n"):
        if line == ".":
            break
        if not line or line[0] not in "=+":
            continue
        fields = line[1:].split(":")
        if len(fields) < 7:
            continue
        key, user, uid, gid, home, dash, ext = fields[:7]
        target = exact if line[0] == "=" else wild
        target.setdefault(key.lower(), (user, _int(uid), _int(gid), home, dash, ext))
    return exact, wild


class _Cached:
    """One file's parsed content, re-parsed when (mtime_ns, size, ino) change."""

    def __init__(self, parse) -> None:
        self._parse = parse
        self._lock = threading.Lock()
        self._key: tuple | None = None
        self._value = None

    def get(self, path: Path):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise AccountsError(f"unable to stat {path}: {exc.strerror}") from None
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        with self._lock:
            if key != self._key:
                try:
                    with open(path, "rb") as f:
                        data = f.read()
                    self._value = self._parse(data)
                except (OSError, CdbError) as exc:
                    raise AccountsError(f"unable to read {path}: {exc}") from None
                self._key = key
            return self._value


class FileAccounts:
    """Assignments from ROOT/users/cdb (as qmail-lspawn) or, when only the
    text exists, ROOT/users/assign; vpopmail users from DOMDIR/vpasswd.cdb or
    DOMDIR/vpasswd."""

    def __init__(self, root: os.PathLike | str) -> None:
        self.root = Path(root)
        self._cdb = _Cached(lambda data: CdbFile(data, "users/cdb"))
        self._assign = _Cached(lambda data: parse_assign(data.decode("utf-8", "surrogateescape")))
        self._vpasswd_lock = threading.Lock()
        self._vpasswd: dict[str, _Cached] = {}

    # --- users/assign ---------------------------------------------------------
    def assignment(self, local: str) -> Assignment | None:
        """qmail-lspawn: exact beats wildcard, longer prefix beats shorter.
        Raises AccountsError when the files cannot be read."""
        cdb = self._cdb.get(self.root / "users" / "cdb")
        if cdb is not None:
            return _cdb_lookup(cdb, local)
        tables = self._assign.get(self.root / "users" / "assign")
        if tables is None:
            return None
        exact, wild = tables
        lower = local.lower()
        hit = exact.get(lower)
        if hit is not None:
            return Assignment(*hit)
        for i in range(len(lower), -1, -1):
            hit = wild.get(lower[:i])
            if hit is not None:
                user, uid, gid, home, dash, pre = hit
                return Assignment(user, uid, gid, home, dash, pre + local[i:])
        return None

    # --- vpasswd ----------------------------------------------------------------
    def vpop_user(self, domain_dir: str, name: str) -> VUser | None:
        """vauth_getpw(name) in the domain whose directory is domain_dir."""
        base = Path(domain_dir)
        with self._vpasswd_lock:
            cached = self._vpasswd.get(domain_dir)
            if cached is None:
                if len(self._vpasswd) > 1000:
                    self._vpasswd.clear()
                cached = self._vpasswd[domain_dir] = _Cached(_parse_vpasswd_any)
        cdb_path = base / "vpasswd.cdb"
        table = cached.get(cdb_path) if cdb_path.exists() else cached.get(base / "vpasswd")
        if table is None:
            return None
        line = table.get(name.lower())
        if line is None:
            return None
        return _vuser(name.lower(), line)


def _cdb_lookup(cdb: CdbFile, local: str) -> Assignment | None:
    lower = ("!" + local).lower().encode("utf-8", "surrogateescape")
    raw_local = local.encode("utf-8", "surrogateescape")
    try:
        wildchars = cdb.get(b"")
        if wildchars is None:
            raise AccountsError("users/cdb has no wildchars record")
        value = cdb.get(lower + b"\0")
        if value is None:
            for i in range(len(lower), 0, -1):
                if i == 1 or lower[i - 1:i] in wildchars:
                    value = cdb.get(lower[:i])
                    if value is not None:
                        value += raw_local[i - 1:]
                        break
    except CdbError as exc:
        raise AccountsError(f"unable to read users/cdb: {exc}") from None
    if value is None:
        return None
    fields = value.decode("utf-8", "surrogateescape").split("\0")
    if len(fields) < 6:
        raise AccountsError("users/cdb: bad record")
    user, uid, gid, home, dash, ext = fields[:6]
    return Assignment(user, _int(uid), _int(gid), home, dash, ext)


def _parse_vpasswd_any(data: bytes) -> dict[str, str]:
    """name → the line after the first `:` (the vpasswd.cdb value form)."""
    if len(data) >= 2048 and b"\n" not in data[:64]:
        try:
            cdb = CdbFile(data, "vpasswd.cdb")
            return {k.decode("utf-8", "surrogateescape"): v.decode("utf-8", "surrogateescape")
                    for k, v in cdb.items()}
        except CdbError:
            pass
    table: dict[str, str] = {}
    for line in data.decode("utf-8", "surrogateescape").split("\n"):
        name, colon, rest = line.partition(":")
        if colon and name:
            table.setdefault(name.lower(), rest)
    return table


def _vuser(name: str, rest: str) -> VUser:
    fields = rest.split(":")
    fields += [""] * (7 - len(fields))
    crypted, uid, gid, gecos, directory, quota = fields[:6]
    clear = fields[6] if len(fields) > 6 else ""
    return VUser(name, crypted, _int(uid), _int(gid), gecos, directory, quota, clear)
