"""Message bytes for flood: built once, CRLF line ends, dot-stuffed, with the
end-of-data marker already attached, so the hot path only writes bytes.
"""
from __future__ import annotations

from pathlib import Path

# Body lines as a typical mail client writes them (RFC 5322 recommends <= 78).
_LINE = 76
_FILL = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


class MessageError(Exception):
    """An --eml directory or file cannot be used."""


def to_wire(raw: bytes) -> bytes:
    """Any line ends → CRLF, dot-stuffed, ending in CRLF (without the final '.')."""
    text = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if text and not text.endswith(b"\n"):
        text += b"\n"
    lines = text.split(b"\n")[:-1] if text else []
    out = [b"." + line if line.startswith(b".") else line for line in lines]
    return b"".join(line + b"\r\n" for line in out)


def synthetic(size: int, sender: str = "flood@bench.invalid",
              recipient: str = "sink@bench.invalid") -> bytes:
    """Headers plus `size` bytes of payload (CRLF counted), like smtp-source -l."""
    headers = (f"From: <{sender}>\r\nTo: <{recipient}>\r\n"
               f"Subject: flood test message\r\n"
               f"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
               f"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n").encode()
    body = bytearray()
    i = 0
    while len(body) < size:
        left = size - len(body)
        n = min(_LINE, left - 2)
        if left - n - 2 == 1:
            n -= 1  # a rest of one byte cannot be a line: this one leaves two
        line = bytes(_FILL[(i + k) % len(_FILL)] for k in range(n))  # n < 0 only for -l 1
        body += line + b"\r\n"
        i += 1
    return to_wire(headers + bytes(body))


def load_eml_dir(path: str, max_files: int) -> list[bytes]:
    """Every *.eml under PATH (sorted, at most max_files) in wire form."""
    root = Path(path)
    if not root.is_dir():
        raise MessageError(f"--eml: not a directory: {path}")
    files = sorted(p for p in root.rglob("*.eml") if p.is_file())[:max_files]
    if not files:
        raise MessageError(f"--eml: no .eml files in {path}")
    out = []
    for p in files:
        try:
            out.append(to_wire(p.read_bytes()))
        except OSError as exc:
            raise MessageError(f"--eml: cannot read {p}: {exc.strerror}") from None
    return out


def unstuff(wire: bytes) -> bytes:
    """Undo dot-stuffing of a message as received (CRLF line ends kept): the
    first "." of every line that starts with one goes (RFC 5321 4.5.2)."""
    if wire.startswith(b"."):
        wire = wire[1:]
    return wire.replace(b"\r\n.", b"\r\n")

