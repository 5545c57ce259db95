"""Local injection: qmail-inject's and sendmail's roles (`qrelay inject`, `qrelay-sendmail`).

Owns turning what a local program writes on stdin into a queued message:
the header is read as qmail-inject reads it (spec §8, qmail-inject.8), its
addresses are qualified, the fields qmail-inject adds when missing are added,
and the message is queued through the spool writer
(`engine.queue.writer.open_spool_writer`) with qmail-queue's
`Received: (qmail PID invoked by uid UID)` line, origin "local". The caller
gets success only once the spool says the message is durable — the same
commit point as the 250 after SMTP's DATA.

What qmail-inject does, and qrelay with it:
- line ends: LF or CRLF in, CRLF stored. A CR that does not end a line is a
  line end too in the body (stored as CRLF) and a space in the header (where
  qmail-inject keeps it inside its field, so it can start no field, such as
  a `Bcc:`, of its own), so the stored message never holds a bare CR that a
  next hop could read as the end of a line (the SMTP side refuses it);
  a NUL byte is refused (exit 100), as the SMTP side refuses it.
- `[smtp] max_hops` Received:/Delivered-To: fields or more are refused
  as a loop (exit 100), as the SMTP side refuses it; qmail-inject has no limit.
- the header ends at the first empty line or at the first line that is not a
  header field (a blank line is put there, as qmail does); a leading `From `
  line becomes `MBOX-Line: From ...`; `Bcc:`, `Resent-Bcc:`, `Return-Path:`
  and `Content-Length:` are removed.
- addresses (arguments, `-f`, To/Cc/Bcc/From/Sender/Reply-To/... fields) are
  qualified: no host → `@defaulthost`, a host without a dot → `.defaultdomain`,
  a trailing `+` → `.plusdomain`, a source route is dropped. In a header only
  the address itself is rewritten; qmail-inject also re-folds the whole field
  at 80 columns, qrelay keeps the rest of the field's text as it was.
- added when missing: `Date:`, `Message-ID: <YYYYMMDDHHMMSS.PID.qmail@idhost>`,
  `From:` (QMAILUSER / MAILUSER / USER / LOGNAME, else the uid's login name,
  else `anonymous`; @ QMAILHOST / MAILHOST, else defaulthost; the full name
  from QMAILNAME / MAILNAME / NAME), and `Cc: recipient list not shown: ;`
  when there is neither To nor Cc. With a Resent- field the Resent- forms.
- recipients (qmail-inject -A): the arguments, or with none the header's
  To/Cc/Bcc/Apparently-To (the Resent- ones when the message is resent);
  `-t` = qmail-inject -H (arguments and header). An empty argument (`''`,
  `<>`) is nobody, as `To: <>` is (qmail-inject queues it, and qmail-lspawn
  drops it with exit 0). A header field qmail-inject cannot parse gives no
  recipients; a bad From/Sender/Reply-To/Return-Path
  line is a permanent error.
- envelope sender: `-f`, else the first Return-Path field, else QMAILSUSER @
  QMAILSHOST (each defaulting to the From user and host). `-f ''` and `-f '<>'`
  are the null sender (qmail would qualify `<>` as an address), and `-f '<a@b>'`
  is a@b.
- QMAILINJECT flags c (name as comment), s (ignore Return-Path), f (drop
  From), i (drop Message-ID); the controls and their variables:
  control/defaulthost (QMAILDEFAULTHOST), defaultdomain (QMAILDEFAULTDOMAIN),
  plusdomain (QMAILPLUSDOMAIN), idhost (QMAILIDHOST), each defaulting to me.
Not done: QMAILINJECT r and m (VERP senders; a `-@[]` sender given with -f
is expanded per recipient by the scheduler, as qmail-send does), QMAILMFTFILE
(Mail-Followup-To), re-folding header fields.

Exit statuses are qmail-inject's: 0 queued, 100 permanent (syntax, no
recipients, too big), 111 temporary (configuration or spool unreachable);
sendmail's bad options are 64 (EX_USAGE). Errors are one line.

Run as root on a spool owned by another user (the `[run] user` of a box that
drops privileges), the spool is opened as that user, so no file in it ever
becomes root's. Any other user queues through the running spool writer's
injection socket (queue/inject.sock, qmail-queue's role: the writer takes the
uid and pid from the kernel and writes the Received line itself); with no
`qrelay run` running, only root and the spool's owner can queue (111).
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from engine.home import default_root
from engine.received import date822, queue_received_line

OK, PERMANENT, TEMPORARY, EX_USAGE = 0, 100, 111, 64


class InjectError(Exception):
    """A one-line reason and the exit status (PERMANENT or TEMPORARY)."""

    def __init__(self, text: str, status: int = PERMANENT) -> None:
        super().__init__(text)
        self.status = status


# --------------------------------------------------------------------------- names

@dataclass(slots=True, frozen=True)
class InjectNames:
    """qmail-inject's controls, read once per run (spec §4 table)."""
    defaulthost: str
    defaultdomain: str
    plusdomain: str
    idhost: str

    @classmethod
    def load(cls, root: Path | str, env: Mapping[str, str]) -> "InjectNames":
        from engine.config.control import ControlError, read_line
        control = Path(root) / "control"
        try:
            me = read_line(control / "me")
            values = {}
            for name in ("defaulthost", "defaultdomain", "plusdomain", "idhost"):
                value = read_line(control / name)
                if value is None:
                    value = me if me is not None else name   # qmail's control_rldef
                # one line: a CR or LF from the environment must not split a field
                values[name] = env.get(f"QMAIL{name.upper()}", value).replace(
                    "\r", " ").replace("\n", " ")
        except ControlError as exc:
            raise InjectError(str(exc), TEMPORARY) from None
        return cls(**values)


@dataclass(slots=True, frozen=True)
class Identity:
    """Who the message is from by default: qmail-inject's environment."""
    user: str                  # From: local part
    host: str | None           # From: host (None = defaulthost)
    full_name: str | None
    return_user: str           # default envelope sender's local part
    return_host: str | None
    name_as_comment: bool = False   # QMAILINJECT c
    ignore_return_path: bool = False  # QMAILINJECT s
    drop_from: bool = False         # QMAILINJECT f
    drop_message_id: bool = False   # QMAILINJECT i

    @classmethod
    def from_env(cls, env: Mapping[str, str], uid: int | None = None) -> "Identity":
        flags = env.get("QMAILINJECT", "")
        host = env.get("QMAILHOST") or env.get("MAILHOST")
        user = (env.get("QMAILUSER") or env.get("MAILUSER") or env.get("USER")
                or env.get("LOGNAME") or _login_name(uid) or "anonymous")
        return cls(
            user=user, host=host,
            full_name=env.get("QMAILNAME") or env.get("MAILNAME") or env.get("NAME"),
            return_user=env.get("QMAILSUSER") or user,
            return_host=env.get("QMAILSHOST") or host,
            name_as_comment="c" in flags, ignore_return_path="s" in flags,
            drop_from="f" in flags, drop_message_id="i" in flags)

    def with_sender(self, sender: str, full_name: str | None) -> "Identity":
        """sendmail -f: the From default becomes the sender (qmail's sendmail
        sets QMAILUSER/QMAILHOST from it and forgets the environment's names).
        `-f '<a@b>'` is a@b here too, as for the envelope (Qualifier.address)."""
        if len(sender) >= 2 and sender[0] == "<" and sender[-1] == ">":
            sender = sender[1:-1]
        user, at, host = sender.rpartition("@")
        if not at:
            user, host = sender, None
        return dataclasses.replace(self, user=user, host=host or None, full_name=full_name,
                                   return_user=user, return_host=host or None)


def _login_name(uid: int | None) -> str | None:
    import pwd
    try:
        return pwd.getpwuid(os.getuid() if uid is None else uid).pw_name
    except (KeyError, OSError):
        return None


# --------------------------------------------------------------------------- RFC 822 tokens

ATOM, QUOTE, LITERAL, COMMENT, SPECIAL = range(5)
_SPECIALS = frozenset('()<>@,;:\\".[]')


@dataclass(slots=True, frozen=True)
class Token:
    kind: int
    text: str        # as written (quotes and brackets included)
    start: int
    end: int


class ParseError(Exception):
    pass


def tokenize(text: str) -> list[Token]:
    """RFC 822 lexical tokens (comments kept, white space dropped)."""
    out: list[Token] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in " \t\r\n":
            i += 1
        elif c == '"' or c == "[":
            close = '"' if c == '"' else "]"
            j = i + 1
            while j < n and text[j] != close:
                j += 2 if text[j] == "\\" else 1
            if j >= n:
                raise ParseError("unterminated quoted string" if c == '"' else "unterminated [")
            out.append(Token(QUOTE if c == '"' else LITERAL, text[i:j + 1], i, j + 1))
            i = j + 1
        elif c == "(":
            depth, j = 1, i + 1
            while j < n and depth:
                if text[j] == "\\":
                    j += 1
                elif text[j] == "(":
                    depth += 1
                elif text[j] == ")":
                    depth -= 1
                j += 1
            if depth:
                raise ParseError("unterminated comment")
            out.append(Token(COMMENT, text[i:j], i, j))
            i = j
        elif c in _SPECIALS:
            if c in ")]\\":
                raise ParseError(f"unexpected {c}")
            out.append(Token(SPECIAL, c, i, i + 1))
            i += 1
        else:
            j = i
            while j < n and text[j] not in _SPECIALS and text[j] not in " \t\r\n":
                j += 1
            out.append(Token(ATOM, text[i:j], i, j))
            i = j
    return out


def _is(tok: Token, char: str) -> bool:
    return tok.kind == SPECIAL and tok.text == char


def address_list(text: str) -> list[list[Token]]:
    """The addr-specs of an RFC 822 address list (groups, route-addrs,
    display names and comments handled), each as its tokens (`<>` as no
    tokens); ParseError if the text is not an address list."""
    tokens = [t for t in tokenize(text) if t.kind != COMMENT]
    out: list[list[Token]] = []
    current: list[Token] = []
    angle: list[Token] | None = None   # inside <...>
    route: list[Token] | None = None   # the last <...> of this mailbox

    def finish() -> None:
        nonlocal current, route
        if route is not None:
            out.append(route)           # <> included: an empty address
        elif current:
            for a, b in zip(current, current[1:]):
                if a.kind != SPECIAL and b.kind != SPECIAL:
                    raise ParseError("words without < > are not an address")
            out.append(current)
        current, route = [], None

    for tok in tokens:
        if angle is not None:
            if _is(tok, ">"):
                route, angle = angle, None
            elif _is(tok, "<"):
                raise ParseError("nested <")
            else:
                angle.append(tok)
        elif _is(tok, "<"):
            if route is not None:
                raise ParseError("two <addresses> in one mailbox")
            angle = []
        elif _is(tok, ">"):
            raise ParseError("> without <")
        elif route is not None and not (_is(tok, ",") or _is(tok, ";")):
            raise ParseError("text after >")
        elif _is(tok, ":") and not any(_is(t, "@") for t in current):
            current = []                # a group's display name
        elif _is(tok, ",") or _is(tok, ";"):
            finish()
        else:
            current.append(tok)
    if angle is not None:
        raise ParseError("< without >")
    finish()
    return out


def _unquote(tok: Token) -> str:
    if tok.kind == QUOTE:
        return re.sub(r"\\(.)", r"\1", tok.text[1:-1], flags=re.S)
    return tok.text


def envelope_form(spec: Sequence[Token]) -> str:
    """The address as the envelope carries it (quoted strings unquoted)."""
    return "".join(_unquote(t) for t in spec)


def header_form(spec: Sequence[Token]) -> str:
    return "".join(t.text for t in spec)


_ATEXT = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\x80-\U0010ffff]+")


def _needs_quote(local: str) -> bool:
    if not local:
        return True
    return not all(_ATEXT.fullmatch(part) for part in local.split("."))


def quote_local(local: str) -> str:
    """qmail's quote(): the local part as a quoted string when it needs one."""
    if not _needs_quote(local):
        return local
    return '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Qualifier:
    """qmail-inject's rwgeneric over one addr-spec's tokens."""

    def __init__(self, names: InjectNames) -> None:
        self.names = names
        self._host = self._tokens("@" + names.defaulthost)
        self._domain = self._tokens("." + names.defaultdomain)
        self._plus = self._tokens("." + names.plusdomain)

    @staticmethod
    def _tokens(text: str) -> list[Token]:
        try:
            return [t for t in tokenize(text) if t.kind != COMMENT]
        except ParseError:
            return [Token(ATOM, text, 0, 0)]

    def qualify(self, spec: Sequence[Token]) -> list[Token]:
        t = list(spec)
        if not t:
            return t                                   # <> stays <>
        if len(t) >= 2 and t[-1].kind == LITERAL and t[-1].text == "[]" and _is(t[-2], "@"):
            return t                                   # <foo@[]> stays
        if _is(t[0], "@"):                             # a source route: drop it
            while t and not _is(t[0], ":"):
                t.pop(0)
            if t:
                t.pop(0)
            if not t:
                return t
        if _is(t[-1], "."):
            t.pop()
            if not t:
                return t
        if _is(t[-1], "@"):
            t.pop()
            if not t:
                return t
        if not any(_is(x, "@") for x in t):
            t += self._host
        last = t[-1]
        if last.kind == ATOM and last.text.endswith("+"):
            t[-1] = Token(ATOM, last.text[:-1], last.start, last.end)
            t += self._plus
        for x in reversed(t):
            if _is(x, "@"):
                t += self._domain
                break
            if _is(x, ".") or x.kind == LITERAL:
                break
        return t

    def address(self, text: str) -> str:
        """A command-line address (qmail's quote2, then rwgeneric), envelope form.
        One pair of surrounding angle brackets is dropped (`-f '<a@b>'`, as
        sendmail and Postfix read it; qmail would quote the `<`)."""
        if len(text) >= 2 and text[0] == "<" and text[-1] == ">":
            text = text[1:-1]
        if not text:
            return ""                                  # quote2: `` stays ``, i.e. <>
        local, at, domain = text.rpartition("@")
        if not at:
            local, domain = text, ""
        quoted = quote_local(local) + (at + domain)
        try:
            tokens = [t for t in tokenize(quoted) if t.kind != COMMENT]
        except ParseError:
            raise InjectError(f"unable to parse address: {text}") from None
        return envelope_form(self.qualify(tokens))


# --------------------------------------------------------------------------- the message

_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+[ \t]*:")

TO_CC = frozenset({"to", "cc"})
HEADER_RCPT = frozenset({"bcc", "apparently-to"})
RESENT_RCPT = frozenset({"resent-to", "resent-cc", "resent-bcc"})
SENDER_LIKE = frozenset({"sender", "from", "reply-to", "return-receipt-to", "errors-to",
                         "resent-sender", "resent-from", "resent-reply-to"})
REMOVED = frozenset({"bcc", "resent-bcc", "return-path", "content-length"})
RESENT = frozenset({"resent-sender", "resent-from", "resent-reply-to", "resent-to",
                    "resent-cc", "resent-bcc", "resent-date", "resent-message-id"})


@dataclass(slots=True, frozen=True)
class Prepared:
    """What qmail-inject hands qmail-queue (before qmail-queue's Received line)."""
    sender: str
    recipients: tuple[str, ...]
    message: bytes             # CRLF line ends


def crlf_lines(data: bytes, bare_cr_ends_line: bool = True) -> bytes:
    """`data` with every line ended by CRLF; LF, CRLF and (unless told
    otherwise) a lone CR all end a line, and a last line without an end gets one."""
    if b"\0" in data:
        raise InjectError("message contains NUL bytes")
    # Not re.sub: it would hold a piece per line end before joining them.
    data = data.replace(b"\r\n", b"\n")
    if bare_cr_ends_line:
        data = data.replace(b"\r", b"\n")
    data = data.replace(b"\n", b"\r\n")
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


_BARE_CR = re.compile(rb"\r(?!\n)")


def _field_name(field: list[str]) -> str:
    name = field[0].split(":", 1)[0]
    return name.rstrip(" \t").lower()


def read_header(data: bytes) -> tuple[list[list[str]], bytes]:
    """qmail's headerbody() over `data` (CRLF line ends): (fields, each a list
    of physical lines without their ends; the body, starting with the blank
    separator line when there is a body). The body stays bytes: a message of
    millions of short lines is never held as one string per line."""
    fields: list[list[str]] = []
    current: list[str] | None = None
    start = 0
    while start < len(data):
        end = data.index(b"\r\n", start)
        line = data[start:end].decode("utf-8", "surrogateescape")
        # A lone CR inside a line is a space: it must not start a field of its
        # own. A line that starts with one is no field (qmail: body from there).
        line = line[:1] + line[1:].replace("\r", " ")
        if current is not None and line[:1] in (" ", "\t"):
            current.append(line)
            start = end + 2
            continue
        if current is not None:
            fields.append(current)
            current = None
        if line == "":
            return fields, data[start:]
        if line.startswith("From "):
            current = ["MBOX-Line: " + line]
        elif _FIELD_NAME.match(line):
            current = [line]
        else:
            return fields, b"\r\n" + data[start:]   # qmail inserts the blank line
        start = end + 2
    if current is not None:
        fields.append(current)
    return fields, b""


def prepare(data: bytes, *, names: InjectNames, identity: Identity, sender: str | None = None,
            arguments: Sequence[str] = (), header_recipients: bool | None = None,
            now: float | None = None, pid: int | None = None, max_hops: int = 0) -> Prepared:
    """qmail-inject on `data`: the envelope and the message to queue.

    `header_recipients`: None = qmail-inject -A (arguments, or the header
    when there are none); True = -H (both); False = -a (arguments only).
    `sender`: -f (already as given; "" or "<>" = the null sender).
    `max_hops`: this many Received:/Delivered-To: fields or more is a loop (a
    program delivery that mails the message on again), refused as the SMTP
    side refuses it; 0 = no limit (qmail-inject has none)."""
    now = time.time() if now is None else now
    pid = os.getpid() if pid is None else pid
    q = Qualifier(names)
    envelope_sender = None
    if sender is not None:
        envelope_sender = "" if sender in ("", "<>") else q.address(sender)
    # An empty argument is <>: nobody, as `To: <>` is (qmail would queue it
    # and qmail-lspawn drop it, exit 0: a script's unset "$RCPT" lost mail).
    rcpts = [r for r in (q.address(a) for a in arguments) if r]
    if header_recipients is None:
        header_recipients = not arguments

    fields, body = read_header(crlf_lines(data, bare_cr_ends_line=False))
    if _BARE_CR.search(body):
        body = crlf_lines(body)
    kept: list[str] = []
    seen: set[str] = set()
    from_header: list[str] = []          # To/Cc/Bcc/Apparently-To
    from_resent: list[str] = []
    for field in fields:
        name = _field_name(field)
        if identity.drop_from and name == "from":
            continue
        if identity.drop_message_id and name == "message-id":
            continue
        if identity.ignore_return_path and name == "return-path":
            continue
        seen.add(name)
        text = "\n".join(field)
        if name in TO_CC or name in HEADER_RCPT or name in RESENT_RCPT:
            target = from_resent if name in RESENT_RCPT else from_header
            try:
                text, found = _rewrite_field(text, q)
            except ParseError:
                found = []               # qmail: a To/Cc it cannot parse gives nobody
            target += [a for a in found if a]
        elif name in SENDER_LIKE or name == "return-path":
            try:
                text, found = _rewrite_field(text, q)
            except ParseError:
                raise InjectError(f"unable to parse this line: {_printable(field[0])}") from None
            if name == "return-path" and envelope_sender is None and found:
                envelope_sender = found[0]
        if name in REMOVED:
            continue
        kept += text.split("\n")

    if max_hops:
        hops = sum(1 for field in fields if _field_name(field) in ("received", "delivered-to"))
        if hops >= max_hops:
            raise InjectError("too many hops, this message is looping")
    resent = bool(seen & RESENT)
    if envelope_sender is None:
        envelope_sender = q.address(identity.return_user + (
            "@" + identity.return_host if identity.return_host else ""))
    if header_recipients:
        rcpts += from_resent if resent else from_header
    if not rcpts:
        raise InjectError("no recipients")
    from engine.smtp.policy import address_syntax_error
    for address in (envelope_sender, *rcpts):
        if address_syntax_error(address):
            raise InjectError(f"unable to parse address: {_printable(address)}")

    prefix = "Resent-" if resent else ""
    added: list[str] = []
    if prefix.lower() + "date" not in seen:
        added.append(f"{prefix}Date: {date822(now).decode('ascii')}")
    if prefix.lower() + "message-id" not in seen:
        added.append(f"{prefix}Message-ID: {message_id(now, pid, names.idhost)}")
    if prefix.lower() + "from" not in seen:
        added.append(f"{prefix}From: {default_from(identity, q)}")
    if prefix.lower() + "to" not in seen and prefix.lower() + "cc" not in seen:
        added.append(f"{prefix}Cc: recipient list not shown: ;")
    # What is added comes from the environment (QMAILUSER, QMAILHOST...): a CR
    # or LF there must neither start a field nor leave a bare line end.
    added = [line.replace("\r", " ").replace("\n", " ") for line in added]
    header = "".join(line + "\r\n" for line in added + kept).encode("utf-8", "surrogateescape")
    message = header + body
    return Prepared(envelope_sender, tuple(rcpts), message)


def _rewrite_field(text: str, q: Qualifier) -> tuple[str, list[str]]:
    """The field with each address qualified in place, and those addresses."""
    colon = text.index(":") + 1
    value = text[colon:]
    specs = address_list(value)
    found: list[str] = []
    edits: list[tuple[int, int, str]] = []
    for spec in specs:
        new = q.qualify(spec)
        found.append(envelope_form(new))
        if new != spec:
            edits.append((spec[0].start, spec[-1].end, header_form(new) if new else ""))
    # One join: a slice per edit would copy the field once per address (a To:
    # of 100,000 host-less names took minutes).
    pieces: list[str] = []
    done = 0
    for start, end, repl in edits:
        pieces += (value[done:start], repl)
        done = end
    pieces.append(value[done:])
    return text[:colon] + "".join(pieces), found


def _printable(text: str) -> str:
    return "".join(c if " " <= c <= "~" else "?" for c in text)[:200]


def message_id(now: float, pid: int, idhost: str) -> str:
    t = time.gmtime(int(now))
    return (f"<{t.tm_year}{t.tm_mon:02d}{t.tm_mday:02d}{t.tm_hour:02d}{t.tm_min:02d}"
            f"{t.tm_sec:02d}.{pid}.qmail@{idhost}>")


def default_from(identity: Identity, q: Qualifier) -> str:
    """qmail-inject's From: user@host, with the full name quoted (or as a
    comment with QMAILINJECT=c)."""
    address = quote_local(identity.user) + ("@" + identity.host if identity.host else "")
    try:
        spec = [t for t in tokenize(address) if t.kind != COMMENT]
        address = header_form(q.qualify(spec))
    except ParseError:
        pass
    name = identity.full_name
    if name is None:
        return address
    name = name.replace("\n", " ").replace("\r", " ")     # one line, quoted or as a comment
    quoted = name.replace("\\", "\\\\").replace('"', '\\"')
    if identity.name_as_comment:
        comment = name.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        return f"{address} ({comment})"
    return f'"{quoted}" <{address}>'


# --------------------------------------------------------------------------- queueing

def read_message(stream, limit: int) -> bytes:
    """All of `stream` (a binary file; None when descriptor 0 is closed, as
    Python leaves sys.stdin then), at most `limit` bytes (0 = no limit)."""
    if stream is None:
        raise InjectError("read error: standard input is closed", TEMPORARY)
    chunks: list[bytes] = []
    size = 0
    try:
        while chunk := stream.read(1 << 16):
            size += len(chunk)
            if limit and size > limit:
                raise InjectError(f"message is larger than {limit} bytes")
            chunks.append(chunk)
    except OSError as exc:
        raise InjectError(f"read error: {exc.strerror or exc}", TEMPORARY) from None
    return b"".join(chunks)


def check_root(root: Path) -> None:
    if not (root / "queue").is_dir():
        raise InjectError(f"{root}: not a qrelay root (no queue/ directory)", TEMPORARY)
    if (root / "queue" / "mess").is_dir() and (root / "queue" / "todo").is_dir():
        raise InjectError(f"{root}: holds a qmail queue (queue/mess, queue/todo): "
                          "use qmail-inject there", TEMPORARY)


def load_spool_settings(root: Path):
    from engine.config.settings import SettingsError, load_settings
    try:
        return load_settings(root)
    except SettingsError as exc:
        raise InjectError(str(exc), TEMPORARY) from None


def become_spool_owner(queue_dir: Path) -> None:
    """As root on a spool another user owns, continue as that user: a
    direct write must never leave root-owned files in the spool (the
    scheduler, running as the owner, could not remove them)."""
    if os.geteuid() != 0:
        return
    st = os.stat(queue_dir)
    if st.st_uid == 0:
        return
    from engine.privilege import drop_to
    try:
        drop_to(st.st_uid, st.st_gid)
    except OSError as exc:
        raise InjectError(f"cannot become the spool's owner (uid {st.st_uid}): "
                          f"{exc.strerror or exc}", TEMPORARY) from None


def through_injection_socket(queue: Path) -> bool:
    """True when this process is neither root nor the spool's owner, so it
    queues through the running writer's injection socket (which writes the
    Received line itself); InjectError(TEMPORARY) when no qrelay run serves it."""
    from engine.queue.writer import INJECT_SOCKET
    if os.geteuid() in (0, os.stat(queue).st_uid):
        return False
    if not (queue / INJECT_SOCKET).exists():
        raise _not_served(queue)
    return True


def _not_served(queue: Path) -> InjectError:
    from engine.queue.writer import INJECT_SOCKET
    return InjectError(f"qq: {queue} belongs to another user and no qrelay run is serving "
                       f"{INJECT_SOCKET}: start qrelay run, or queue as root", TEMPORARY)


def queue_message(root: Path, prepared: Prepared, *, uid: int, pid: int | None = None,
                  now: float | None = None, settings=None) -> int:
    """qmail-queue: prepend its Received line and enqueue; returns the message
    id once the message is durable. InjectError(TEMPORARY) on any spool failure."""
    from engine.queue import Envelope, SpoolError
    from engine.queue import records
    from engine.queue.values import MessageTooBig, WriterUnreachable
    from engine.queue.writer import INJECT_SOCKET, SpoolClient, open_spool_writer
    pid = os.getpid() if pid is None else pid
    now = time.time() if now is None else now
    settings = settings or load_spool_settings(root)
    check_root(root)
    envelope = Envelope(prepared.sender, prepared.recipients, pid=pid, uid=uid, origin="local")
    queue = root / "queue"
    local_user = through_injection_socket(queue)
    if local_user:
        message = prepared.message        # the writer adds the Received line itself
    else:
        message = queue_received_line(pid=pid, origin="local", uid=uid, when=now) + prepared.message
        become_spool_owner(queue)
    # The spool refuses it too (AddressTooLong), but through the writer as a
    # temporary error: an address no retry will shorten is permanent here.
    if why := records.oversized_address((envelope.sender, *envelope.recipients)):
        raise InjectError(f"qq: {why}")
    spool = None
    try:
        # The frame limit known here, a message over it is refused before it
        # is sent (the writer would close the connection on it).
        spool = (SpoolClient(queue / INJECT_SOCKET, max_frame=settings.spool.max_frame_bytes)
                 if local_user else open_spool_writer(queue, settings.spool))
        return spool.enqueue(envelope, message)
    except MessageTooBig as exc:
        # Stored with CRLF line ends it is over the spool's frame limit: no retry helps.
        raise InjectError(f"qq: {exc}") from None
    except WriterUnreachable as exc:
        # The socket a stopped qrelay run left behind (or one gone meanwhile).
        raise (_not_served(queue) if local_user else InjectError(f"qq: {exc}", TEMPORARY)) from None
    except SpoolError as exc:
        raise InjectError(f"qq: {exc}", TEMPORARY) from None
    except OSError as exc:
        raise InjectError(f"qq: {exc.strerror or exc}", TEMPORARY) from None
    except Exception as exc:    # anything else (lmdb's own errors...) is temporary too
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InjectError(f"qq: {text}", TEMPORARY) from None
    finally:
        if spool is not None:
            try:
                spool.close()
            except (SpoolError, OSError):
                pass


def inject(root: Path | str, data: bytes, *, sender: str | None = None,
           arguments: Sequence[str] = (), header_recipients: bool | None = None,
           env: Mapping[str, str] | None = None, identity: Identity | None = None,
           uid: int | None = None, queue: bool = True) -> tuple[Prepared, int | None]:
    """qmail-inject from start to end: (what was queued, its message id;
    None with queue=False, qmail-inject -n)."""
    root = Path(root)
    env = os.environ if env is None else env
    uid = os.getuid() if uid is None else uid
    if not (root / "control").is_dir():
        raise InjectError(f"{root}: no such qrelay root (no control/ directory)", TEMPORARY)
    names = InjectNames.load(root, env)
    settings = load_spool_settings(root)
    identity = identity or Identity.from_env(env, uid)
    now = time.time()
    prepared = prepare(data, names=names, identity=identity, sender=sender, arguments=arguments,
                       header_recipients=header_recipients, now=now,
                       max_hops=settings.smtp.max_hops)
    if not queue:
        return prepared, None
    return prepared, queue_message(root, prepared, uid=uid, now=now, settings=settings)


# --------------------------------------------------------------------------- sendmail

USAGE = ("usage: sendmail [-t] [-i] [-f sender] [-F name] [-bm|-bs|-bp] [-q] "
         "[-o option] [recipient ...]")
# qmail's sendmail accepts these and ignores them (-B, -e, -p, -o take a value).
_IGNORED_FLAGS = frozenset("vimx")
_IGNORED_WITH_VALUE = frozenset("Bep")


@dataclass(slots=True)
class SendmailArgs:
    mode: str = "inject"        # inject | smtp (-bs) | list (-bp) | flush (-q)
    headers: bool = False       # -t
    sender: str | None = None   # -f or -r
    full_name: str | None = None  # -F
    recipients: tuple[str, ...] = ()


class UsageError(Exception):
    pass


def parse_sendmail_args(argv: Sequence[str], prog: str = "sendmail") -> SendmailArgs:
    """sendmail's options as qmail's sendmail reads them (getopt: clustered
    flags, `-fX` or `-f X`, options end at `--` or the first non-option),
    with `-r` as `-f` (qmail's usage error; Sendmail, Postfix and Exim take it)."""
    args = SendmailArgs()
    if os.path.basename(prog) == "mailq":
        args.mode = "list"
    rest = list(argv)
    i = 0
    while i < len(rest):
        word = rest[i]
        if word == "--":
            i += 1
            break
        if not word.startswith("-") or word == "-":
            break
        j = 1
        while j < len(word):
            opt = word[j]
            j += 1
            if opt in _IGNORED_FLAGS or opt == "t" or opt == "q":
                if opt == "t":
                    args.headers = True
                elif opt == "q":
                    if j < len(word):
                        raise UsageError(f"unsupported option -q{word[j:]} (only -q: flush now)")
                    args.mode = "flush"
                continue
            if opt in _IGNORED_WITH_VALUE or opt in "frFob":
                if j < len(word):
                    value = word[j:]
                else:
                    i += 1
                    if i >= len(rest):
                        raise UsageError(f"option -{opt} needs a value")
                    value = rest[i]
                j = len(word)
                if opt in "fr":       # -r: sendmail's and Postfix's old name for -f
                    args.sender = value
                elif opt == "F":
                    args.full_name = value
                elif opt == "b":
                    if value == "s":
                        args.mode = "smtp"
                    elif value == "p":
                        args.mode = "list"
                    elif value != "m":
                        raise UsageError(f"unsupported option -b{value}")
                # -o anything (-oi, -odi, -odb, -oem...) and -B/-e/-p: accepted, ignored
                continue
            raise UsageError(f"unknown option -{opt}")
        i += 1
    args.recipients = tuple(rest[i:])
    return args


def sendmail_main(argv: Sequence[str] | None = None) -> None:
    """The `qrelay-sendmail` program (an admin links /usr/sbin/sendmail to it).
    ROOT is $QRELAY_ROOT, else /var/qrelay."""
    import signal

    # Ctrl-C ends it by the signal, as it ends qmail-inject: no traceback, nothing queued
    # unless already durable (Python would raise KeyboardInterrupt wherever it is).
    # An ignored SIGINT (a script's `sendmail ... &`) stays ignored.
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    argv = list(sys.argv if argv is None else argv)
    prog = argv[0] if argv else "sendmail"
    try:
        args = parse_sendmail_args(argv[1:], prog)
    except UsageError as exc:
        sys.stderr.write(f"sendmail: {exc}; {USAGE}\n")
        sys.exit(EX_USAGE)
    if os.path.basename(prog) == "newaliases":
        # Debian links it to sendmail and package scripts run it: qmail's sendmail
        # refuses it (100) rather than read stdin as a message.
        sys.stderr.write("sendmail: fatal: newaliases: qrelay has no aliases database "
                         "(aliases are .qmail files: qrelay alias)\n")
        sys.exit(PERMANENT)
    root = default_root()
    if args.mode in ("list", "flush"):
        import click

        from engine.cli import cli
        try:
            cli.main(args=["qread" if args.mode == "list" else "flush", root], prog_name="qrelay",
                     standalone_mode=False)
        except click.ClickException as exc:   # e.g. a user who may not read the spool
            sys.stderr.write(f"sendmail: fatal: {exc.format_message()}\n")
            sys.exit(TEMPORARY)               # qmail-qread's 111
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            sys.stderr.write(f"sendmail: fatal: {where}{exc.strerror or exc}\n")
            sys.exit(TEMPORARY)
        return
    try:
        if args.mode == "smtp":
            sys.exit(serve_stdio(Path(root)))
        identity = Identity.from_env(os.environ)
        if args.sender is not None and args.sender not in ("", "<>"):
            identity = identity.with_sender(args.sender, args.full_name)
        elif args.full_name is not None:
            identity = dataclasses.replace(identity, full_name=args.full_name)
        base = Path(root)
        settings = load_spool_settings(base) if (base / "control").is_dir() else None
        limit = settings.smtp.max_message_bytes if settings else 0
        data = read_message(getattr(sys.stdin, "buffer", None), limit)
        inject(base, data, sender=args.sender, arguments=args.recipients,
               header_recipients=True if args.headers else False, identity=identity)
    except InjectError as exc:
        sys.stderr.write(f"sendmail: fatal: {exc}\n")
        sys.exit(exc.status)
    except OSError as exc:      # e.g. a ROOT this user may not reach
        where = f"{exc.filename}: " if exc.filename else ""
        sys.stderr.write(f"sendmail: fatal: {where}{exc.strerror or exc}\n")
        sys.exit(TEMPORARY)
    sys.exit(OK)


# --------------------------------------------------------------------------- sendmail -bs

class _LocalClientRules:
    """tcp.smtp for `sendmail -bs`: qmail's sendmail sets qmail-smtpd's
    environment itself (RELAYCLIENT, DATABYTES=0, localhost, 127.0.0.1)."""

    def __init__(self) -> None:
        from types import MappingProxyType

        from engine.config.tcprules import Rule
        self.rule = Rule(True, MappingProxyType({
            "RELAYCLIENT": "", "DATABYTES": "0", "TCPLOCALHOST": "localhost",
            "TCPREMOTEHOST": "localhost", "TCPREMOTEINFO": "sendmail-bs"}))

    def match(self, ip: str, host: str | None = None, info: str | None = None):
        return self.rule


class LocalSubmitSpool:
    """The spool as seen by an SMTP session on stdin: what it queues is a
    local injection (origin "local", qmail-queue's `invoked by uid N` line in
    place of the receiver's `invoked from network`). `via_socket`: the spool
    is the injection socket, whose writer writes that line itself."""

    def __init__(self, spool, uid: int, via_socket: bool = False) -> None:
        self.spool = spool
        self.uid = uid
        self.via_socket = via_socket

    async def submit(self, envelope, message: bytes) -> int:
        envelope = dataclasses.replace(envelope, origin="local", uid=self.uid)
        end = message.find(b"\r\n") + 2
        if message.startswith(b"Received: (qmail ") and b" invoked from network); " in message[:end]:
            message = message[end:] if self.via_socket else queue_received_line(
                pid=envelope.pid, origin="local", uid=self.uid, when=time.time()) + message[end:]
        return await self.spool.submit(envelope, message)

    def close(self) -> None:
        self.spool.close()


class StdioTransport:
    """An asyncio transport over two file descriptors (stdin, stdout) for one
    SmtpSession. A thread reads (a regular file works as well as a pipe);
    replies are written at once, blocking: the peer is one local program."""

    def __init__(self, loop, protocol, rfd: int, wfd: int) -> None:
        import threading
        self.loop = loop
        self.protocol = protocol
        self.rfd, self.wfd = rfd, wfd
        self.closed = loop.create_future()
        self._closing = False
        self._paused = False
        self._held: list[bytes | None] = []     # read while paused (None = EOF)
        self._may_read = threading.Event()
        self._may_read.set()
        self._thread = threading.Thread(target=self._reader, name="stdin", daemon=True)

    def start(self) -> None:
        self.protocol.connection_made(self)
        if not self._closing:
            self._thread.start()

    def _reader(self) -> None:
        while not self._closing:
            self._may_read.wait()
            if self._closing:
                return
            try:
                data = os.read(self.rfd, 1 << 16)
            except OSError:
                data = b""
            try:
                self.loop.call_soon_threadsafe(self._arrived, data or None)
            except RuntimeError:
                return      # the loop is gone
            if not data:
                return

    def _arrived(self, data: bytes | None) -> None:
        if self._closing:
            return
        if self._paused:
            self._held.append(data)
            return
        if data is None:
            if not self.protocol.eof_received():
                self.close()
        else:
            self.protocol.data_received(data)

    # --- the transport API SmtpSession uses -------------------------------------------

    def get_extra_info(self, name: str, default=None):
        if name in ("peername", "sockname"):
            return ("127.0.0.1", 0)
        return default

    def write(self, data: bytes) -> None:
        if self._closing:
            return
        view = memoryview(data)
        try:
            while view:
                n = os.write(self.wfd, view)
                view = view[n:]
        except OSError:
            self.abort()

    def set_protocol(self, protocol) -> None:
        # STARTTLS: engine.tls_transport reads the handshake and records from here on.
        self.protocol = protocol

    def pause_reading(self) -> None:
        self._paused = True
        self._may_read.clear()

    def resume_reading(self) -> None:
        if not self._paused:
            return
        self._paused = False
        self._may_read.set()
        held, self._held = self._held, []
        for data in held:
            self.loop.call_soon(self._arrived, data)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._may_read.set()
        self.loop.call_soon(self._lost)

    abort = close

    def _lost(self) -> None:
        self.protocol.connection_lost(None)
        if not self.closed.done():
            self.closed.set_result(None)


def serve_stdio(root: Path, rfd: int = 0, wfd: int = 1) -> int:
    """`sendmail -bs`: qmail-smtpd's dialogue (the receivers' own SmtpSession)
    on stdin/stdout, as qmail's sendmail runs qmail-smtpd with RELAYCLIENT set.
    A user who cannot open the spool queues through the injection socket, as
    for `sendmail -t` (Symfony Mailer runs `sendmail -bs` as the web server's user).
    Returns the exit status once the client has quit or gone."""
    import asyncio

    from engine.smtp.config import ConfigError, load_smtp_config
    from engine.smtp.connlimit import ConnectionTable
    from engine.smtp.receiver import Receiver
    from engine.smtp.session import SmtpSession
    from engine.queue.writer import INJECT_SOCKET, SpoolClient, open_spool_writer

    check_root(root)
    try:
        config = load_smtp_config(root)
    except ConfigError as exc:
        raise InjectError(str(exc), TEMPORARY) from None
    smtp = dataclasses.replace(config.settings.smtp, reverse_dns=False)
    config = dataclasses.replace(config, rules=_LocalClientRules(),
                                 settings=dataclasses.replace(config.settings, smtp=smtp))
    uid = os.getuid()
    queue = root / "queue"
    via_socket = through_injection_socket(queue)     # before the greeting: 111 if no writer
    if not via_socket:
        become_spool_owner(queue)

    async def main() -> None:
        spool = LocalSubmitSpool(SpoolClient(queue / INJECT_SOCKET) if via_socket
                                 else open_spool_writer(queue, config.settings.spool),
                                 uid, via_socket)
        receiver = Receiver(config, spool, ConnectionTable(1).counter(0))
        receiver.uid = uid
        try:
            session = SmtpSession(receiver)
            transport = StdioTransport(asyncio.get_running_loop(), session, rfd, wfd)
            transport.start()
            while not transport.closed.done():
                await asyncio.wait([transport.closed], timeout=1.0)
                session.check_idle(time.monotonic())
            if receiver.tasks:
                await asyncio.gather(*list(receiver.tasks), return_exceptions=True)
        finally:
            spool.close()

    asyncio.run(main())
    return OK


if __name__ == "__main__":
    sendmail_main()
