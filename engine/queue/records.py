"""Byte layout of every record the spool stores in its LMDB index.

This module owns the encoding only: keys, record structs, the format version
and the integrity check. It never opens a file or a transaction.

Every value record is `version (u8) | crc32 of payload (u32, big-endian) | payload`.
A value whose version is unknown or whose crc does not match raises
`RecordError`; the spool then quarantines the message it belongs to.

Keys are big-endian so LMDB's byte order is numeric order:

    messages    msgid(u64)                          -> MessageRecord
    recipients  msgid(u64) index(u32)               -> RecipientRecord
    due         channel(u8) next_try_ms(u64) msgid(u64) index(u32) -> b""
    todo        msgid(u64)                          -> b""
    bounces     msgid(u64)                          -> b""   (finished with failures)
    segments    segid(u64)                          -> SegmentRecord
    held        msgid(u64)                          -> held since (f64)  (qrelay hold)
    imported    source key (bytes)                  -> msgid(u64) + b"R"|b"A"|b"D"  (import-qmail)
                b"\0" msgid(u64), while "R"          -> source key
    meta        b"format" -> u32, b"next_id" -> u64, b"boot_id" -> bytes,
                b"surgery" -> u64 (bumped by every hold/release/requeue/delete)

The envelope of every message is also written into its segment, beside the
bytes (`EnvelopeRecord`), so a segment's tail can be indexed again when a
crash came between a message's segment sync (its 250) and its index commit.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

# Byte layout of each record (LMDB values, segment records).
FORMAT_VERSION = 1
# The spool as a whole (meta b"format"). 2: envelopes in segments, segment
# records with their indexed end, acknowledged at the segment sync. A format-1
# spool is upgraded in place on open.
SPOOL_FORMAT = 2

# Recipient states.
TODO = 0        # queued, not yet classified local/remote (qmail's todo/)
PENDING = 1     # classified, never tried yet; due now
DEFERRED = 2    # tried, temporary failure; due at next_try
DELIVERED = 3   # done
FAILED = 4      # done, permanent failure (goes into the bounce)
FINISHED_STATES = (DELIVERED, FAILED)
STATE_NAMES = {TODO: "todo", PENDING: "pending", DEFERRED: "deferred",
               DELIVERED: "delivered", FAILED: "failed"}

# Channels.
NO_CHANNEL = 0
LOCAL = 1
REMOTE = 2
CHANNEL_CODES = {"local": LOCAL, "remote": REMOTE}
CHANNEL_NAMES = {NO_CHANNEL: "todo", LOCAL: "local", REMOTE: "remote"}

ORIGIN_CODES = {"network": 0, "bounce": 1, "local": 2}
ORIGIN_NAMES = {v: k for k, v in ORIGIN_CODES.items()}

# Longest error/reason text kept per recipient: a remote server's reply can be
# long, and the record must stay small (the index is read on every mark).
MAX_TEXT_BYTES = 2000
MAX_ADDRESS_BYTES = 65535

_HEAD = struct.Struct(">BI")
_MSG = struct.Struct(">dQQQIIIBIIIH")
_RCPT = struct.Struct(">BBHdH")
_TEXT_LEN = struct.Struct(">H")
_SEG_V1 = struct.Struct(">IBId")
_SEG = struct.Struct(">IBIdqQ")
_ENV = struct.Struct(">dIIBI")
_ENV_RCPT = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")
_RKEY = struct.Struct(">QI")
_DUEKEY = struct.Struct(">BQQI")


class RecordError(ValueError):
    """A stored record is torn, corrupt or of an unknown format version."""


def seal(payload: bytes) -> bytes:
    return _HEAD.pack(FORMAT_VERSION, zlib.crc32(payload)) + payload


def unseal(value: bytes) -> bytes:
    if len(value) < _HEAD.size:
        raise RecordError(f"record too short ({len(value)} bytes)")
    version, crc = _HEAD.unpack_from(value)
    if version != FORMAT_VERSION:
        raise RecordError(f"record format version {version}, expected {FORMAT_VERSION}")
    payload = bytes(value[_HEAD.size:])
    if zlib.crc32(payload) != crc:
        raise RecordError("record checksum mismatch")
    return payload


def encode_text(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def oversized_address(addresses) -> str | None:
    """Why one of `addresses` cannot be in an index record (over
    MAX_ADDRESS_BYTES encoded: its length is 16 bits), or None."""
    for address in addresses:
        # Four bytes a character at most: only a long one is encoded.
        if len(address) * 4 > MAX_ADDRESS_BYTES and len(encode_text(address)) > MAX_ADDRESS_BYTES:
            return (f"an envelope address is over the spool's {MAX_ADDRESS_BYTES} bytes "
                    f"({len(address)} characters)")
    return None


def decode_text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


@dataclass(slots=True, frozen=True)
class MessageRecord:
    """Envelope and bookkeeping of one queued message."""
    birth: float          # unix time the message was committed
    segid: int            # segment file holding the bytes
    offset: int           # offset of the segment record header
    length: int           # message bytes
    crc: int              # crc32 of the message bytes
    pid: int
    uid: int
    origin: str
    nrcpt: int
    remaining: int        # recipients not yet delivered or failed
    nfailed: int
    sender: str

    def encode(self) -> bytes:
        sender = encode_text(self.sender)
        return seal(_MSG.pack(self.birth, self.segid, self.offset, self.length, self.crc,
                              self.pid, self.uid, ORIGIN_CODES[self.origin], self.nrcpt,
                              self.remaining, self.nfailed, len(sender)) + sender)

    @classmethod
    def decode(cls, value: bytes) -> "MessageRecord":
        payload = unseal(value)
        try:
            (birth, segid, offset, length, crc, pid, uid, origin, nrcpt, remaining, nfailed,
             slen) = _MSG.unpack_from(payload)
        except struct.error as exc:
            raise RecordError(f"message record: {exc}") from None
        sender = payload[_MSG.size:]
        if len(sender) != slen or origin not in ORIGIN_NAMES or remaining > nrcpt:
            raise RecordError("message record fields inconsistent")
        return cls(birth, segid, offset, length, crc, pid, uid, ORIGIN_NAMES[origin], nrcpt,
                   remaining, nfailed, decode_text(sender))


@dataclass(slots=True, frozen=True)
class RecipientRecord:
    """State of one recipient of one message."""
    state: int
    channel: int
    attempts: int
    next_try: float       # meaningful for PENDING/DEFERRED
    address: str
    text: str = ""        # last error (DEFERRED) or reason (FAILED)

    def encode(self) -> bytes:
        addr = encode_text(self.address)
        text = encode_text(self.text)[:MAX_TEXT_BYTES]
        return seal(_RCPT.pack(self.state, self.channel, min(self.attempts, 65535),
                               self.next_try, len(addr)) + addr + _TEXT_LEN.pack(len(text)) + text)

    @classmethod
    def decode(cls, value: bytes) -> "RecipientRecord":
        payload = unseal(value)
        try:
            state, channel, attempts, next_try, alen = _RCPT.unpack_from(payload)
            pos = _RCPT.size
            addr = payload[pos:pos + alen]
            pos += alen
            (tlen,) = _TEXT_LEN.unpack_from(payload, pos)
            pos += _TEXT_LEN.size
        except struct.error as exc:
            raise RecordError(f"recipient record: {exc}") from None
        text = payload[pos:pos + tlen]
        if (len(addr) != alen or len(text) != tlen or pos + tlen != len(payload)
                or state not in STATE_NAMES or channel not in CHANNEL_NAMES):
            raise RecordError("recipient record fields inconsistent")
        return cls(state, channel, attempts, next_try, decode_text(addr), decode_text(text))


@dataclass(slots=True, frozen=True)
class SegmentRecord:
    """Bookkeeping of one segment file: how many live messages it holds."""
    live: int
    sealed: bool          # its writer has moved on: no more appends
    pid: int              # writer process
    created: float
    end: int = -1         # end of the last record indexed (-1: unknown, format 1)
    started: int = 0      # the writer's start time (/proc ticks since boot; 0 unknown):
    #                       with pid, tells the writer from a later process with its pid

    def encode(self) -> bytes:
        return seal(_SEG.pack(self.live, int(self.sealed), self.pid, self.created, self.end,
                              self.started))

    @classmethod
    def decode(cls, value: bytes) -> "SegmentRecord":
        payload = unseal(value)
        if len(payload) == _SEG.size:
            live, sealed, pid, created, end, started = _SEG.unpack(payload)
        elif len(payload) == _SEG_V1.size:
            (live, sealed, pid, created), end, started = _SEG_V1.unpack(payload), -1, 0
        else:
            raise RecordError("segment record has the wrong length")
        return cls(live, bool(sealed), pid, created, end, started)


@dataclass(slots=True, frozen=True)
class EnvelopeRecord:
    """A message's envelope as written into its segment (for re-indexing)."""
    birth: float
    pid: int
    uid: int
    origin: str
    sender: str
    recipients: tuple[str, ...]

    def encode(self) -> bytes:
        parts = [_ENV.pack(self.birth, self.pid, self.uid, ORIGIN_CODES[self.origin],
                           len(self.recipients))]
        for text in (self.sender, *self.recipients):
            raw = encode_text(text)
            parts.append(_ENV_RCPT.pack(len(raw)))
            parts.append(raw)
        return b"".join(parts)

    @classmethod
    def decode(cls, payload: bytes) -> "EnvelopeRecord":
        try:
            birth, pid, uid, origin, nrcpt = _ENV.unpack_from(payload)
            pos = _ENV.size
            texts = []
            for _ in range(nrcpt + 1):
                (n,) = _ENV_RCPT.unpack_from(payload, pos)
                pos += _ENV_RCPT.size
                if pos + n > len(payload):
                    raise RecordError("envelope record is truncated")
                texts.append(decode_text(payload[pos:pos + n]))
                pos += n
        except struct.error as exc:
            raise RecordError(f"envelope record: {exc}") from None
        if pos != len(payload) or origin not in ORIGIN_NAMES:
            raise RecordError("envelope record fields inconsistent")
        return cls(birth, pid, uid, ORIGIN_NAMES[origin], texts[0], tuple(texts[1:]))


def u64(n: int) -> bytes:
    return _U64.pack(n)


# An imported message's key: reserved (its index commit not yet made),
# adopted (indexed from its segment by a repair instead), done.
IMPORT_RESERVED, IMPORT_ADOPTED, IMPORT_DONE = b"R", b"A", b"D"


def reserved_import_key(msgid: int) -> bytes:
    """`imported` key of the reverse entry (msgid -> source key) of a reserved id."""
    return b"\0" + _U64.pack(msgid)


def read_u64(raw: bytes) -> int:
    return _U64.unpack(raw)[0]


def u32(n: int) -> bytes:
    return _U32.pack(n)


def read_u32(raw: bytes) -> int:
    return _U32.unpack(raw)[0]


def rcpt_key(msgid: int, index: int) -> bytes:
    return _RKEY.pack(msgid, index)


def split_rcpt_key(key: bytes) -> tuple[int, int]:
    return _RKEY.unpack(key)


def time_ms(t: float) -> int:
    return max(0, int(t * 1000))


def due_key(channel: int, next_try: float, msgid: int, index: int) -> bytes:
    return _DUEKEY.pack(channel, time_ms(next_try), msgid, index)


def split_due_key(key: bytes) -> tuple[int, int, int, int]:
    """(channel, next_try_ms, msgid, index)"""
    return _DUEKEY.unpack(key)


def due_prefix(channel: int) -> bytes:
    return bytes([channel])


def due_upper(channel: int, now: float) -> bytes:
    """Smallest key after every entry of `channel` due at or before `now`."""
    return struct.pack(">BQ", channel, time_ms(now) + 1)
