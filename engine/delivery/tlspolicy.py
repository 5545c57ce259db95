"""Outbound TLS policy: control/tlsdestinations (s/qmail's format), the client
SSL contexts, and the check of the certificate a next hop presented.

A line is `DEST:[CAFILE][|CIPHERS][;PORT]`. DEST is a host name with a one
character prefix that sets the level; the name matched is the recipient
domain, or the smtproutes relay when the domain is routed (as s/qmail's
qmail-remote does). Rules marked * also match parent domains written with a
leading dot (`.example.com` matches every host under example.com, as in
smtproutes). Lookup order, first match wins (s/qmail's tls_destination):

    !H*   no TLS, even when the next hop offers STARTTLS
    %H    TLS required; the certificate's digest must equal CAFILE `=<hex>`
          (40/56/64/128 hex digits: SHA-1/224/256/512), no CA involved
    =H    TLS required; chain verified, a certificate name equal to the
          host's name (no wildcard)
    ~H*   TLS required; chain verified, the host's name (a `*.` wildcard
          matches one label)
    H*    the same as ~H (s/qmail checks the chain only; qrelay checks the
          name too: a chain alone proves nothing about who answered)
    -H*   TLS required, certificate not checked (encrypted only)
    then the general rules  !*  =*  ~*  +*  -*  (the same levels for every host),
    then  *   opportunistic; with a CAFILE the certificate is verified
          -   opportunistic, certificate not checked

No match, or no file: opportunistic without checks (qmail-tls's default;
s/qmail sends in clear then).

"The host's name" is the name of the MX (or relay) being connected to, the
name also sent as SNI. CAFILE is a PEM bundle, or a directory of hashed CA
files when it ends in `/`; relative paths are relative to ROOT; empty =
`[delivery] tls_ca_file`, else the system's CAs. CIPHERS is an OpenSSL
cipher string for TLS 1.2 (default: control/tlsclientciphers, else
OpenSSL's). PORT replaces the port of the delivery; port 465 means implicit
TLS (SMTPS), as qmail-tls does.

qmail-tls's own per-host files are read too (a box running Vermeulen's
patch, as the jms1 combined patch does, has them instead of
tlsdestinations), by the name of the MX (or relay) host connected to,
wherever tlsdestinations has only the opportunistic default for the
destination (no rule, `*` or `-`):

    control/tlshosts/H.pem        TLS required to H, chain verified with that
                                  file, H's name (`*.` matches one label)
    control/notlshosts/H          never TLS to H (tlshosts/H.pem wins)
    control/tlshosts/exhaustivelist   no TLS to hosts without a tlshosts file

control/clientcert.pem (qmail-tls; `make cert` links it to servercert.pem)
is the certificate and key presented to a next hop that asks for one, e.g.
a smarthost that relays for its clients' certificates. One that does not
load is refused like a malformed control file (qmail-tls would defer only
at next hops that ask).

Opportunistic TLS never defers for a TLS reason: a next hop that does not
offer STARTTLS or refuses it is used in clear on the same connection, and a
failed handshake or a certificate that does not verify (`*:CAFILE`) is
retried in clear on a new connection (qmail-tls defers forever instead).
Required TLS defers with qmail-tls's texts.

This module parses, builds contexts and checks certificates; it never
connects to anything (engine.delivery.smtpclient does).
"""
from __future__ import annotations

import hashlib
import ipaddress
import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from engine.config.control import read_list, read_numbered_lines
from engine.tls import MIN_VERSIONS, TlsError, load_certificate

NONE = "none"            # never STARTTLS
MAY = "may"              # opportunistic
ENCRYPT = "encrypt"      # required, any certificate
VERIFY = "verify"        # required, chain and name (wildcards allowed)
FQDN = "fqdn"            # required, chain and exact name
FINGERPRINT = "fingerprint"  # required, certificate digest

REQUIRED = frozenset({ENCRYPT, VERIFY, FQDN, FINGERPRINT})
SMTPS_PORT = 465

# s/qmail's host rules in its order: (prefix, level, parent domains match?)
_HOST_RULES = (("!", NONE, True), ("%", FINGERPRINT, False), ("=", FQDN, False),
               ("~", VERIFY, True), ("", VERIFY, True), ("-", ENCRYPT, True))
_GENERAL_RULES = (("!*", NONE), ("=*", FQDN), ("~*", VERIFY), ("+*", VERIFY), ("-*", ENCRYPT),
                  ("*", MAY), ("-", MAY))
_HOST_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789.-_[]")
_DIGESTS = {40: "sha1", 56: "sha224", 64: "sha256", 128: "sha512"}


class TlsPolicyError(ValueError):
    """A control/tlsdestinations line qrelay refuses (one line naming file and line)."""


@dataclass(slots=True, frozen=True)
class TlsPolicy:
    """What to do about TLS towards one destination."""
    level: str = MAY
    cafile: str = ""          # PEM bundle ("" = the default CAs)
    capath: str = ""          # directory of hashed CA files
    fingerprint: str = ""     # lower-case hex digest (level FINGERPRINT)
    ciphers: str = ""
    port: int = 0             # 0 = the delivery's own port
    rule: str = ""            # the tlsdestinations key that matched ("" = none)

    @property
    def required(self) -> bool:
        return self.level in REQUIRED

    @property
    def verifies(self) -> bool:
        """The chain is checked against CAs (MAY only with a CA given)."""
        return self.level in (VERIFY, FQDN) or (self.level == MAY and bool(self.cafile or self.capath))

    def ca_name(self, default_cafile: str) -> str:
        return self.cafile or self.capath or default_cafile or "the system CAs"


DEFAULT_POLICY = TlsPolicy()


def _parse_value(value: str, root: Path) -> tuple[str, str, int]:
    """`CAFILE[|CIPHERS][;PORT]` -> (cafile, ciphers, port)."""
    port = 0
    if ";" in value:
        value, _, text = value.rpartition(";")
        if not (text.isascii() and text.isdigit() and 0 < int(text) < 65536):
            raise ValueError(f"bad port {text!r} (a number from 1 to 65535)")
        port = int(text)
    cafile, _, ciphers = value.partition("|")
    if cafile and not cafile.startswith("=") and not os.path.isabs(cafile):
        cafile = str(root / cafile)
    return cafile, ciphers, port


class TlsDestinations:
    """The control/tlsdestinations table: `lookup(host)` gives a TlsPolicy;
    `for_host` applies qmail-tls's per-host files to one MX."""

    __slots__ = ("_table", "_stamp", "_hosts", "_exhaustive")

    def __init__(self, table: dict[str, TlsPolicy] | None = None, stamp: tuple = (),
                 hosts: dict[str, TlsPolicy] | None = None, exhaustive: bool = False) -> None:
        self._table: dict[str, TlsPolicy] = dict(table or {})
        # The CA files' (path, size, mtime): a reload that finds a CA file
        # changed yields a different snapshot, so new contexts are built.
        self._stamp = stamp
        self._hosts: dict[str, TlsPolicy] = dict(hosts or {})   # tlshosts/, notlshosts/
        self._exhaustive = exhaustive                             # tlshosts/exhaustivelist

    @classmethod
    def from_lines(cls, lines: Iterable[tuple[int, str]], root: Path | str = "/",
                   where: str = "control/tlsdestinations") -> "TlsDestinations":
        """Parse (line number, text) pairs; raises TlsPolicyError naming the line."""
        root = Path(root)
        table: dict[str, TlsPolicy] = {}
        for number, line in lines:
            line = line.rstrip(" \t\r")
            if not line or line.startswith("#"):
                continue
            try:
                key, policy = _parse_line(line, root)
            except ValueError as exc:
                raise TlsPolicyError(f"{where} line {number}: {exc}") from None
            table.setdefault(key, policy)   # the first of duplicate keys wins (constmap)
        stamp = []
        for policy in table.values():
            for path in (policy.cafile, policy.capath):
                if path:
                    try:
                        st = os.stat(path)
                    except OSError as exc:
                        raise TlsPolicyError(f"{where}: CA {path}: {exc.strerror}") from None
                    stamp.append((path, st.st_size, st.st_mtime_ns))
        return cls(table, tuple(sorted(stamp)))

    @classmethod
    def load(cls, root: Path | str) -> "TlsDestinations":
        """Read ROOT/control/tlsdestinations (missing = opportunistic everywhere)
        and qmail-tls's control/tlshosts/ and control/notlshosts/."""
        path = Path(root) / "control" / "tlsdestinations"
        table = cls.from_lines(read_numbered_lines(path) or [], root, str(path))
        hosts, exhaustive, stamp = _qmail_tls_hosts(Path(root) / "control")
        return cls(table._table, table._stamp + stamp, hosts, exhaustive)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, TlsDestinations) and self._table == other._table
                and self._stamp == other._stamp and self._hosts == other._hosts
                and self._exhaustive == other._exhaustive)

    __hash__ = None  # type: ignore[assignment]

    def __len__(self) -> int:
        """Rules of every kind (0: opportunistic everywhere)."""
        return len(self._table) + len(self._hosts) + int(self._exhaustive)

    def lookup(self, host: str) -> TlsPolicy:
        host = host.lower().rstrip(".")
        suffixes = [host] + [host[i:] for i, c in enumerate(host) if c == "."]
        for prefix, _level, parents in _HOST_RULES:
            for name in (suffixes if parents else suffixes[:1]):
                policy = self._table.get(prefix + name)
                if policy is not None:
                    return policy
        for key, _level in _GENERAL_RULES:
            policy = self._table.get(key)
            if policy is not None:
                return policy
        return DEFAULT_POLICY

    def for_host(self, policy: TlsPolicy, host: str) -> TlsPolicy:
        """The policy for a connection to MX (or relay) `host`, given the
        destination's: qmail-tls's per-host files decide where tlsdestinations
        has only the opportunistic default."""
        if (not self._hosts and not self._exhaustive) or policy.rule not in _OPPORTUNISTIC:
            return policy
        found = self._hosts.get(host.lower().rstrip("."))
        if found is not None:
            return found
        return _NOT_LISTED if self._exhaustive else policy


# tlsdestinations rules that leave a destination to qmail-tls's per-host files.
_OPPORTUNISTIC = frozenset({"", "*", "-"})
_NOT_LISTED = TlsPolicy(NONE, rule="tlshosts/exhaustivelist")


def _qmail_tls_hosts(control: Path) -> tuple[dict[str, TlsPolicy], bool, tuple]:
    """qmail-tls's control/tlshosts/H.pem and control/notlshosts/H: (policy by
    lower-case host name, whether tlshosts/exhaustivelist exists, the CA
    files' stamps)."""
    hosts: dict[str, TlsPolicy] = {}
    stamp = []
    exhaustive = False
    for entry in _entries(control / "tlshosts"):
        if entry.name == "exhaustivelist":
            exhaustive = True
        elif entry.name.endswith(".pem") and len(entry.name) > 4:
            try:
                st = entry.stat()
            except OSError:
                continue
            hosts[entry.name[:-4].lower()] = TlsPolicy(VERIFY, cafile=entry.path,
                                                       rule=f"tlshosts/{entry.name}")
            stamp.append((entry.path, st.st_size, st.st_mtime_ns))
    for entry in _entries(control / "notlshosts"):
        hosts.setdefault(entry.name.lower(), TlsPolicy(NONE, rule=f"notlshosts/{entry.name}"))
    return hosts, exhaustive, tuple(sorted(stamp))


def _entries(directory: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(directory) as it:
            return [e for e in it if not e.name.startswith(".")]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _parse_line(line: str, root: Path) -> tuple[str, TlsPolicy]:
    key, sep, value = line.partition(":")
    if not sep:
        raise ValueError(f"no ':' in {line!r} (a rule is DEST:[CAFILE][|CIPHERS][;PORT])")
    key = key.strip().lower()
    general = dict(_GENERAL_RULES)
    if key in general:
        level, name = general[key], key
    else:
        prefix = key[:1] if key[:1] in "!%=~-" else ""
        level = next(lv for p, lv, _ in _HOST_RULES if p == prefix)
        name = key[len(prefix):]
        if not name or not set(name) <= _HOST_CHARS:
            raise ValueError(f"bad destination {key!r} in {line!r}")
    cafile, ciphers, port = _parse_value(value.strip(), root)
    fingerprint = capath = ""
    if level == FINGERPRINT:
        digest = cafile.removeprefix("=").lower()
        if not cafile.startswith("=") or len(digest) not in _DIGESTS \
                or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"{key!r} needs '=' and a hex SHA-1/224/256/512 digest, not {cafile!r}")
        fingerprint, cafile = digest, ""
    elif cafile.startswith("="):
        raise ValueError(f"a fingerprint is only for a %HOST rule, in {line!r}")
    elif cafile.endswith("/"):
        capath, cafile = cafile, ""
    if level in (NONE, ENCRYPT):
        cafile = capath = ""   # nothing to verify with
    if key == "-":
        cafile = capath = ""
    if ciphers:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).set_ciphers(ciphers)
        except ssl.SSLError:
            raise ValueError(f"no usable cipher in {ciphers!r}") from None
    return key, TlsPolicy(level, cafile, capath, fingerprint, ciphers, port, key)


def read_client_ciphers(root: Path | str) -> str:
    """control/tlsclientciphers (qmail-tls): lines joined with ':'; "" = OpenSSL's."""
    path = Path(root) / "control" / "tlsclientciphers"
    text = ":".join(read_list(path) or [])
    if text:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).set_ciphers(text)
        except ssl.SSLError:
            raise TlsPolicyError(f"{path}: no usable cipher in {text!r}") from None
    return text


CLIENT_CERT_FILE = "control/clientcert.pem"


def read_client_cert(root: Path | str) -> tuple[str, tuple]:
    """control/clientcert.pem's path and (inode, size, mtime), or ("", ()) when
    there is none; TlsPolicyError when it exists but does not load."""
    path = Path(root) / CLIENT_CERT_FILE
    try:
        st = path.stat()
    except FileNotFoundError:
        return "", ()
    except OSError as exc:
        raise TlsPolicyError(f"{path}: {exc.strerror}") from None
    try:
        # Never a passphrase prompt (engine.tls.load_certificate says so in one line).
        load_certificate(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), path, str(path))
    except TlsError as exc:
        raise TlsPolicyError(str(exc)) from None
    return str(path), (st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(slots=True)
class TlsContexts:
    """Client SSL contexts, built on first use and shared by every connection
    with the same verification needs (loading the system CAs costs ~10 ms)."""
    min_version: str = "TLSv1.2"       # a key of engine.tls.MIN_VERSIONS
    default_cafile: str = ""
    default_ciphers: str = ""
    client_cert: str = ""              # control/clientcert.pem, checked by read_client_cert
    _cache: dict = field(default_factory=dict)

    def get(self, policy: TlsPolicy) -> ssl.SSLContext:
        verify = policy.verifies
        key = (verify, policy.cafile if verify else "", policy.capath if verify else "",
               policy.ciphers or self.default_ciphers)
        ctx = self._cache.get(key)
        if ctx is None:
            ctx = self._cache[key] = self._build(verify, policy)
        return ctx

    def _build(self, verify: bool, policy: TlsPolicy) -> ssl.SSLContext:
        # PROTOCOL_TLS_CLIENT: the ssl module's secure defaults (no SSLv3,
        # no compression, OpenSSL's default ciphers). Names are checked by
        # check_peer (qmail-tls's rules and texts), so OpenSSL's own
        # hostname check is off; the chain is checked by OpenSSL.
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = MIN_VERSIONS[self.min_version]
        ctx.check_hostname = False
        ciphers = policy.ciphers or self.default_ciphers
        if ciphers:
            ctx.set_ciphers(ciphers)
        if self.client_cert:
            try:
                # Never OpenSSL's passphrase prompt (it waits on the terminal or stdin).
                ctx.load_cert_chain(self.client_cert, password=lambda: b"")
            except (ssl.SSLError, OSError):
                # Broken since it was read: the reload that follows the change
                # says so (and keeps this courier); meanwhile, no certificate.
                pass
        if not verify:
            ctx.verify_mode = ssl.CERT_NONE
            return ctx
        ctx.verify_mode = ssl.CERT_REQUIRED
        cafile = policy.cafile or (self.default_cafile if not policy.capath else "")
        if cafile or policy.capath:
            ctx.load_verify_locations(cafile=cafile or None, capath=policy.capath or None)
        else:
            ctx.load_default_certs()
        return ctx


def check_peer(ssl_object: ssl.SSLObject, policy: TlsPolicy, name: str) -> str | None:
    """After the handshake: None if the certificate satisfies `policy` for
    host `name`, else why not (qmail-tls's wording, without "; connected to")."""
    if policy.level == FINGERPRINT:
        der = ssl_object.getpeercert(binary_form=True)
        if not der:
            return f"TLS unable to verify server {name}: no certificate provided"
        digest = hashlib.new(_DIGESTS[len(policy.fingerprint)], der).hexdigest()
        if digest != policy.fingerprint:
            return f"TLS fingerprint of server {name} does not match control/tlsdestinations"
        return None
    if policy.level not in (VERIFY, FQDN) and not (policy.level == MAY and policy.verifies):
        return None
    cert = ssl_object.getpeercert()
    if not cert:
        return f"TLS unable to verify server {name}: no certificate provided"
    return _check_name(cert, name, wildcard=policy.level != FQDN)


def _check_name(cert: dict, name: str, wildcard: bool) -> str | None:
    # qmail-tls: subjectAltName DNS names first, the CN only when there are
    # none; case-insensitive; `*.domain` matches exactly one label.
    name = name.lower().rstrip(".")
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        address = None
    sans = cert.get("subjectAltName", ())
    if address is not None:
        ips = [v for k, v in sans if k == "IP Address"]
        if any(_same_ip(v, address) for v in ips):
            return None
        return f"TLS unable to verify server {name}: certificate contains no matching iPAddress"
    dns = [v.lower() for k, v in sans if k == "DNS"]
    if dns:
        if any(_name_matches(d, name, wildcard) for d in dns):
            return None
        # (sic) qmail-tls's text, kept for log parsers.
        return f"TLS unable to verify server {name}: certificate contains no matching dNSNnames"
    cns = [v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"]
    if not cns:
        return f"TLS unable to verify server {name}: certificate contains no valid commonName"
    if _name_matches(cns[-1].lower(), name, wildcard):
        return None
    return f"TLS unable to verify server {name}: received certificate for {cns[-1]}"


def _name_matches(pattern: str, name: str, wildcard: bool) -> bool:
    pattern = pattern.rstrip(".")
    if pattern == name:
        return True
    if wildcard and pattern.startswith("*.") and "." in name:
        return name.split(".", 1)[1] == pattern[2:]
    return False


def _same_ip(text: str, address) -> bool:
    try:
        return ipaddress.ip_address(text.strip()) == address
    except ValueError:
        return False
