"""qmail-showctl for a qrelay root: what each control file makes qrelay do.

`show(root)` returns qmail-showctl's text (spec §8: a header, then per file a
blank line and `NAME: ` + the value's sentence, `(Default.) ` first when the
file is absent), read with the readers the services use, so the defaults
and refusals are qrelay's:

- qmail-showctl's files that qrelay reads, in its order and with its
  sentences (`qmqpservers` and the SPF patch's files are not read, so they
  are not among them);
- a value qrelay would refuse at start (`databytes` of `10MB`, a broken
  certificate, no `rcpthosts`, a tcp.smtp or smtproutes line that does not
  parse, a corrupt cdb) is an `Oops! ` line saying why, where qmail-showctl
  only says `Oops! Trouble reading this file.` for a read error;
- then the files qrelay reads beyond netqmail (qmail-tls's, ucspi-tcp's
  tcp.smtp, concurrencyincoming, defaultdelivery, s/qmail's tlsdestinations);
- then every other entry of control/: `NAME: I have no idea what this file
  does.`, qmail-showctl's line, which here also means qrelay ignores it.

Only reads; never writes anything.
"""
from __future__ import annotations

import os
import ssl
from pathlib import Path

from engine.config.cdb import CdbError, CdbFile
from engine.config.control import ControlError, read_line, read_list, read_number
from engine.config.tcprules import RULES_CDB, TcpRules, TcpRulesError

# qmail's conf-break, conf-patrn: the extension delimiter and the mode bits
# that make a home or .qmail refused (engine.delivery.local.dotqmail).
BREAK = "-"
PATRN = 0o002


class ShowctlError(Exception):
    """ROOT has no control/ to show (one line)."""


class _Out:
    """qmail-showctl's do_int / do_str / do_lst (number, line, items), over
    one root's control/."""

    def __init__(self, control: Path) -> None:
        self.control = control
        self.lines: list[str] = []
        self.me: str | None = None
        self.shown: set[str] = set()

    def _head(self, name: str) -> str:
        self.shown.add(name)
        return f"{name}: "

    def oops(self, name: str, why: str) -> None:
        self.lines += ["", f"{self._head(name)}Oops! {why}"]

    def number(self, name: str, default: int, pre: str, post: str = "", *,
               minimum: int = 0, refused_below: int = 0) -> None:
        path = self.control / name
        try:
            value = read_number(path, default, minimum=refused_below)
        except ControlError as exc:
            return self.oops(name, f"{_relative(exc, self.control)}: qrelay refuses it.")
        lead = "" if path.exists() else "(Default.) "
        self.lines += ["", f"{self._head(name)}{lead}{pre}{max(value, minimum)}{post}."]

    def line(self, name: str, default: str | None, pre: str) -> None:
        """`default` None: control/me's value (qmail's flagme), else the file's
        own name as qmail-showctl prints when me is missing too."""
        try:
            value = read_line(self.control / name)
        except ControlError as exc:
            return self.oops(name, f"Trouble reading this file: {exc}.")
        lead = ""
        if value is None:
            lead = "(Default.) "
            value = default if default is not None else (self.me or name)
        self.lines += ["", f"{self._head(name)}{lead}{pre}{_safe(value)}."]

    def items(self, name: str, default: str, pre: str, post: str) -> bool | None:
        try:
            items = read_list(self.control / name)
        except ControlError as exc:
            self.oops(name, f"Trouble reading this file: {exc}.")
            return None
        if items is None:
            self.lines += ["", f"{self._head(name)}(Default.) {default}"]
            return False
        self.lines += ["", self._head(name)] + [f"{pre}{_safe(i)}{post}" for i in items]
        return True

    def say(self, name: str, text: str, *more: str) -> None:
        self.lines += ["", f"{self._head(name)}{text}", *more]

    def refused(self, name: str, load, errors) -> bool:
        """Run `load`, the reader the services use for `name`; an error it
        raises (qrelay run would not start) is the file's Oops! line."""
        try:
            load()
        except errors as exc:
            self.oops(name, f"{_relative(exc, self.control)}: qrelay refuses it.")
            return True
        return False


def _safe(text: str) -> str:
    """qmail-showctl's safeput: bytes outside 32..126 as `?`."""
    return "".join(c if 32 <= ord(c) <= 126 else "?" for c in text)


def _relative(exc: Exception, control: Path) -> str:
    return str(exc).replace(f"{control}/", "")


def show(root: os.PathLike | str) -> str:
    """qmail-showctl's output for ROOT (see the module docstring)."""
    from engine.config.settings import Settings, SettingsError, load_settings

    root = Path(root)
    control = root / "control"
    if not control.is_dir():
        raise ShowctlError(f"{control}: no such directory (not a qrelay or qmail home)")
    out = _Out(control)
    lines = out.lines
    lines += [f"qmail home directory: {root}.", f"user-ext delimiter: {BREAK}.",
              f"paternalism (in decimal): {PATRN}."]
    try:
        out.me = read_line(control / "me")
    except ControlError as exc:
        lines.append(f"Oops! Trouble reading control/me: {exc}.")
        return "\n".join(lines) + "\n"
    try:
        settings = load_settings(root)
    except SettingsError as exc:
        settings = Settings()     # qrelay's defaults below
        lines += [f"Oops! {exc}: qrelay refuses to start."]

    out.items("badmailfrom", "Any MAIL FROM is allowed.", "", " not accepted in MAIL FROM.")
    out.line("bouncefrom", "MAILER-DAEMON", "Bounce user name is ")
    out.line("bouncehost", None, "Bounce host name is ")
    out.number("concurrencylocal", 10, "Local concurrency is ")
    out.number("concurrencyremote", 20, "Remote concurrency is ")
    _databytes(out, settings)
    out.line("defaultdomain", None, "Default domain name is ")
    out.line("defaulthost", None, "Default host name is ")
    out.line("doublebouncehost", None, "2B recipient host: ")
    out.line("doublebounceto", "postmaster", "2B recipient user: ")
    out.line("envnoathost", None, "Presumed domain name is ")
    out.line("helohost", None, "SMTP client HELO host name is ")
    out.line("idhost", None, "Message-ID host name is ")
    out.line("localiphost", None, "Local IP address becomes ")
    out.items("locals", "Messages for me are delivered locally.", "Messages for ",
              " are delivered locally.")
    if out.me is None:
        out.oops("me", "There is no control/me: qrelay refuses to start.")
    else:
        out.line("me", "", "My name is ")
    out.items("percenthack", "The percent hack is not allowed.",
              "The percent hack is allowed for user%host@", ".")
    out.line("plusdomain", None, "Plus domain name is ")
    out.number("queuelifetime", 604800, "Message lifetime in the queue is ", " seconds")
    _rcpthosts(out)
    out.line("smtpgreeting", None, "SMTP greeting: 220 ")
    from engine.delivery.routes import RoutesError, SmtpRoutes
    if not out.refused("smtproutes", lambda: SmtpRoutes.load(control), RoutesError):
        out.items("smtproutes", "No artificial SMTP routes.", "SMTP route: ", "")
    out.number("timeoutconnect", 60, "SMTP client connection timeout is ", " seconds", minimum=1)
    out.number("timeoutremote", 1200, "SMTP client data timeout is ", " seconds", minimum=1)
    out.number("timeoutsmtpd", 1200, "SMTP server data timeout is ", " seconds", minimum=1)
    out.items("virtualdomains", "No virtual domains.", "Virtual domain: ", "")

    _qrelay_files(out, settings)
    try:
        names = sorted(os.listdir(control))
    except OSError as exc:
        names = []
        lines += ["", f"Oops! Unable to list control/: {exc.strerror}."]
    for name in names:
        if name not in out.shown:
            lines += ["", f"{name}: I have no idea what this file does."]
    return "\n".join(lines) + "\n"


def _databytes(out: _Out, settings) -> None:
    cap = settings.smtp.max_message_bytes
    try:
        value = max(read_number(out.control / "databytes", 0), 0)
    except ControlError as exc:
        return out.oops("databytes", f"{_relative(exc, out.control)}: qrelay refuses it.")
    lead = "" if (out.control / "databytes").exists() else "(Default.) "
    tail = f" (none: [smtp] max_message_bytes = {cap} applies)" if value == 0 else ""
    out.say("databytes", f"{lead}SMTP DATA limit is {value} bytes{tail}.")


def _rcpthosts(out: _Out) -> None:
    if not (out.control / "rcpthosts").exists():
        out.oops("rcpthosts", "There is no rcpthosts: qrelay refuses to start "
                              "(it would be an open relay).")
        listed = False
    else:
        listed = out.items("rcpthosts", "", "SMTP clients may send messages to recipients at ", ".")
    if listed:
        out.items("morercpthosts", "No effect.",
                  "SMTP clients may send messages to recipients at ", ".")
    else:
        out.items("morercpthosts", "No rcpthosts; morercpthosts is irrelevant.",
                  "No rcpthosts; doesn't matter that morercpthosts has ", ".")
    cdb = out.control / "morercpthosts.cdb"
    if not (cdb.exists() and out.refused("morercpthosts.cdb", lambda: CdbFile.open(cdb).check(), CdbError)):
        out.say("morercpthosts.cdb", _cdb_state(out.control, "morercpthosts", "morercpthosts.cdb",
                                                "qrelay newmrh"))


def _cdb_state(control: Path, text: str, cdb: str, command: str) -> str:
    """qmail-showctl's morercpthosts.cdb sentence, for any text file and its cdb."""
    try:
        text_mtime = os.stat(control / text).st_mtime
    except OSError:
        text_mtime = None
    try:
        cdb_mtime = os.stat(control / cdb).st_mtime
    except OSError:
        cdb_mtime = None
    if text_mtime is None and cdb_mtime is None:
        return "(Default.) No effect."
    if text_mtime is None:
        return f"Oops! {cdb} exists but {text} doesn't."
    if cdb_mtime is None:
        return f"Oops! {text} exists but {cdb} doesn't."
    if text_mtime > cdb_mtime:
        return f"Oops! {cdb} is older than {text}: run `{command}`."
    return "Modified recently enough; hopefully up to date."


def _qrelay_files(out: _Out, settings) -> None:
    """The files qrelay reads beyond netqmail's, alphabetically."""
    from engine.delivery.tlspolicy import TlsDestinations, TlsPolicyError, read_client_cert

    control = out.control
    try:
        if read_client_cert(control.parent)[0]:
            out.say("clientcert.pem", "Shown to a next hop that asks for a client certificate.")
        else:
            out.say("clientcert.pem", "(Default.) No client certificate is shown.")
    except TlsPolicyError as exc:
        out.oops("clientcert.pem", f"{_relative(exc, control)}.")
    out.number("concurrencyincoming", settings.smtp.max_connections,
               "Incoming SMTP concurrency is ", refused_below=1)
    out.items("defaultdelivery", "Default delivery is ./Maildir/.", "Default delivery: ", "")
    _host_dir(out, "notlshosts", "No STARTTLS to ")
    _servercert(out)
    # The text is read only without the cdb (as tcpserver -x reads only the cdb).
    has_cdb = (control / RULES_CDB).exists()
    if has_cdb or not out.refused("tcp.smtp", lambda: TcpRules.load(control), TcpRulesError):
        out.items("tcp.smtp", "No rules: every client may connect, none may relay.", "Rule: ", "")
    if not (has_cdb and out.refused("tcp.smtp.cdb", lambda: TcpRules.load(control),
                                    TcpRulesError)):
        cdb = _cdb_state(control, "tcp.smtp", "tcp.smtp.cdb", "qrelay tcprules")
        if cdb.startswith("Oops! tcp.smtp exists but"):
            cdb = "(Default.) tcp.smtp is read as it is."
        out.say("tcp.smtp.cdb", cdb)
    _rule_variables(out)
    _ciphers(out, "tlsclientciphers")
    if not out.refused("tlsdestinations", lambda: TlsDestinations.load(control.parent),
                       TlsPolicyError):
        out.items("tlsdestinations", "Opportunistic TLS to every destination.",
                  "TLS destination: ", "")
    _host_dir(out, "tlshosts", "TLS required to ")
    _ciphers(out, "tlsserverciphers")


# The tcp.smtp variables qrelay acts on (engine/smtp/session.py). Any other a
# moved box's rules set (QMAILQUEUE for a scanner, CHKUSER_*, SMTPAUTH ...)
# changes nothing here, which is worth knowing before the move.
RULE_VARIABLES = frozenset(("RELAYCLIENT", "RBLSMTPD", "DATABYTES", "TCPLOCALHOST",
                            "TCPREMOTEHOST", "TCPREMOTEINFO"))


def _rule_variables(out: _Out) -> None:
    """A line for each variable the rules qrelay reads set and qrelay ignores."""
    try:
        rules = TcpRules.load(out.control)
    except (TcpRulesError, OSError):
        return          # said above
    names = sorted({n for _, rule in rules.items() for n in rule.env} - RULE_VARIABLES)
    out.lines += [f"Rule variable {_safe(n)}: I have no idea what it does; qrelay ignores it."
                  for n in names]


def _servercert(out: _Out) -> None:
    path = out.control / "servercert.pem"
    if not path.exists():
        return out.say("servercert.pem", "(Default.) No certificate: no STARTTLS, "
                                         "no submissions or pop3s listener.")
    from engine.tls import TlsError, load_certificate
    try:
        # Never a passphrase prompt: an encrypted key hung showctl on the terminal.
        load_certificate(ssl.create_default_context(ssl.Purpose.CLIENT_AUTH), path, "")
    except TlsError as exc:
        why = str(exc).removeprefix(": ")
        return out.oops("servercert.pem", f"{why[:1].upper()}{why[1:]}: qrelay refuses to start.")
    out.say("servercert.pem", "Certificate and key for STARTTLS, submissions and pop3s.")


def _ciphers(out: _Out, name: str) -> None:
    try:
        items = read_list(out.control / name)
    except ControlError as exc:
        return out.oops(name, f"Trouble reading this file: {exc}.")
    if not items:
        return out.say(name, "(Default.) OpenSSL's default ciphers.")
    out.say(name, f"Ciphers: {_safe(':'.join(items))}.")


def _host_dir(out: _Out, name: str, pre: str) -> None:
    """qmail-tls's tlshosts/ and notlshosts/: one file per host."""
    try:
        entries = sorted(os.listdir(out.control / name))
    except FileNotFoundError:
        return out.say(name, "(Default.) None.")
    except OSError as exc:
        return out.oops(name, f"{exc.strerror}.")
    more = []
    for entry in entries:
        if name == "tlshosts" and entry == "exhaustivelist":
            more.append("TLS only to the hosts listed here (exhaustivelist).")
        elif name == "tlshosts" and entry.endswith(".pem"):
            more.append(f"{pre}{_safe(entry[:-4])}, verified with tlshosts/{_safe(entry)}.")
        elif name == "notlshosts":
            more.append(f"{pre}{_safe(entry)}.")
    out.lines += ["", out._head(name) + ("" if more else "(Default.) None.")] + more
