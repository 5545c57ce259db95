"""The spool's public values and errors: what callers pass in and get back.

Owns no state and does no I/O; engine.queue.spool produces and consumes these.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple


# --------------------------------------------------------------------------- errors

class SpoolError(Exception):
    """Any spool failure."""


class SpoolWriteError(SpoolError):
    """Disk full or write error during enqueue; nothing was committed (451)."""


class WriterUnreachable(SpoolWriteError):
    """No spool writer answers on its socket (none runs, or it left the file)."""


class SpoolVersionError(SpoolError):
    """The spool was written by a newer qrelay (format version too high)."""


class MessageNotFound(SpoolError, KeyError):
    """No such message in the spool (finished, released or quarantined)."""


class MessageQuarantined(SpoolError):
    """The message's records or bytes were corrupt; it was moved to quarantine."""


class MessageTooBig(SpoolError):
    """The message and its envelope are more than the spool writer takes in
    one frame ([spool] max_frame_bytes): refused before it is sent."""


class AddressTooLong(SpoolError):
    """An envelope address longer than the index's records hold
    (records.MAX_ADDRESS_BYTES): refused before anything is written, since its
    index commit would fail, and every commit of the mail behind it."""


class MessageUnreadable(SpoolError):
    """The message's bytes could not be read just now (EACCES, EIO, EMFILE...):
    nothing says they are corrupt, so it stays queued for the next try."""


# --------------------------------------------------------------------------- values

@dataclass(slots=True, frozen=True)
class Envelope:
    sender: str                    # "" = null sender <>
    recipients: tuple[str, ...]
    pid: int = 0                   # qmail's "qp": pid of the process that queued it
    uid: int = 0
    origin: str = "network"        # "network" | "bounce" | "local"


@dataclass(slots=True, frozen=True)
class Job:
    """One recipient of one message that is due for a delivery attempt."""
    msgid: int
    index: int                     # recipient index within the message
    address: str
    channel: str                   # "local" | "remote"
    attempts: int                  # attempts made so far (0 = first try)
    next_try: float                # when it became due
    birth: float                   # when the message was queued
    sender: str
    size: int                      # message bytes
    origin: str
    last_error: str = ""


@dataclass(slots=True, frozen=True)
class Finished:
    """A message all of whose recipients are delivered or failed."""
    msgid: int
    sender: str
    failed: tuple[tuple[str, str], ...]    # (address, reason) for the bounce
    delivered: tuple[str, ...]
    size: int
    birth: float
    origin: str
    released: bool    # False: kept until release() — the bounce must be queued first


@dataclass(slots=True, frozen=True)
class Delivered:
    msgid: int
    index: int


@dataclass(slots=True, frozen=True)
class Deferred:
    msgid: int
    index: int
    next_try: float
    error: str = ""
    attempted: bool = True    # False: only made due earlier (no attempt to count)


@dataclass(slots=True, frozen=True)
class Failed:
    msgid: int
    index: int
    reason: str = ""


Result = Delivered | Deferred | Failed


@dataclass(slots=True, frozen=True)
class ImportedRecipient:
    """A recipient of a message moved in from another queue, in its state there."""
    address: str
    channel: str            # "local" | "remote" | "todo" (not yet classified)
    state: str              # "todo" | "pending" | "deferred" | "delivered" | "failed"
    next_try: float = 0.0   # pending/deferred: when it is due
    text: str = ""          # failed: the reason (goes into the bounce)


@dataclass(slots=True, frozen=True)
class ImportedMessage:
    """A message moved in from another queue (qrelay import-qmail): it keeps
    its birth (retries and queuelifetime carry over) and its recipients'
    states. `key` names it in the source queue, so a second run after a
    crash recognises what was already moved (Spool.import_messages)."""
    key: bytes
    sender: str
    recipients: tuple[ImportedRecipient, ...]
    data: bytes
    birth: float
    pid: int = 0
    uid: int = 0


class SpoolStats(NamedTuple):
    messages: int           # qstat "messages in queue"
    not_preprocessed: int   # qstat "... but not yet preprocessed" (the todo table)


@dataclass(slots=True, frozen=True)
class RecipientView:
    address: str
    channel: str            # "local" | "remote" | "todo" (not yet preprocessed)
    state: str              # "todo" | "pending" | "deferred" | "delivered" | "failed"
    done: bool
    attempts: int
    next_try: float
    text: str


@dataclass(slots=True, frozen=True)
class QueuedMessage:
    msgid: int
    birth: float
    size: int
    sender: str
    origin: str
    pid: int
    uid: int
    preprocessed: bool
    bouncing: bool          # some recipient failed: a bounce is (or will be) pending
    recipients: tuple[RecipientView, ...]
    held: bool = False      # on hold (qrelay hold): nothing delivered until released


@dataclass(slots=True)
class RecoveryReport:
    messages: int = 0
    quarantined: list[int] = field(default_factory=list)
    dangling_removed: int = 0
    segments_fixed: int = 0
    orphan_segments_removed: list[str] = field(default_factory=list)
