"""Remote delivery: qmail-remote's role, for many messages and connections at once.

`RemoteDelivery.deliver(domain, sender, recipients, message)` picks the
addresses to try (smtproutes, else MX with A/AAAA fallback, ipme), talks SMTP
through a pool that reuses connections, and returns one qmail-style result per
recipient: "K" delivered, "Z" deferred, "D" failed, with qmail-remote's texts
(spec §7). Where qmail is weak we do better, and say so here:

- the next address is tried on a connection failure **and** on a greeting
  that is not 220 (a 421 "too busy", a 554, a timeout or a hang-up before or
  during EHLO) — qmail defers instead —, the latter at most
  `max_greeting_failures` times; once EHLO/HELO succeeded we stay with
  that host, as qmail does;
- EHLO (HELO after a 5xx), PIPELINING, SIZE and 8BITMIME when offered;
  all recipients in one transaction; one connection for many messages;
- a message whose stored bytes hold a bare CR or LF cannot end DATA early at
  the next hop (see smtpclient.data_wire);
- TLS as qmail-tls's qmail-remote does it, per control/tlsdestinations
  (engine.delivery.tlspolicy), except that an opportunistic handshake that
  fails is retried in clear at once instead of deferring the message
  forever; a message sent encrypted is reported `<ip> TLS transmitted
  message accepted.` (s/qmail's text), and a required TLS that cannot be
  had moves on to the next address, then defers with qmail-tls's text.

This module never touches the spool: a courier reads the message
(engine.delivery.channels), and the scheduler records the results.
"""
from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from engine.config.control import ControlError, read_line, read_number
from engine.config.settings import SettingsError, load_settings
from engine.delivery.bounce import wire_sender
from engine.delivery.channels import RecipientResult
from engine.delivery.mx import (TEXT_DNS_SOFT, MxResolver, MxTarget, ResolveError, apply_ipme,
                                host_addresses, parse_ip_literal)
from engine.delivery.routes import RoutesError, SmtpRoutes
from engine.delivery.smtpclient import (ConnectFailed, ConnectionDied, ConnectionPool,
                                        GreetingFailed, NameRejected, NoLocalResources,
                                        PoolLimits, Reply, TlsFailed, TlsRequest,
                                        TransactionOutcome)
from engine.delivery.tlspolicy import (TlsContexts, TlsDestinations, TlsPolicyError,
                                       read_client_cert, read_client_ciphers)

TEXT_NO_CONNECTION = "Sorry, I wasn't able to establish an SMTP connection. (#4.4.1)\n"
# qmail-remote's temp_oserr: no socket for want of a local resource (open files).
TEXT_NO_RESOURCES = "System resources temporarily unavailable. (#4.3.0)\n"
TEXT_BAD_ADDRESS = "Sorry, that address contains a line break or NUL. (#5.1.3)\n"


def destination_unreached(text: str) -> bool:
    """A deferral that says the destination itself was not reached: its name
    did not resolve, no connection, no greeting, or the connection lost. Only
    these are made due at once when the destination takes mail again (the
    scheduler's recovery); a recipient or message it turned away for now
    (greylisting, a full mailbox, a rate limit) waits for its retry slot."""
    if text.startswith((TEXT_NO_CONNECTION, TEXT_DNS_SOFT)):
        return True
    first = text.partition("\n")[0]
    return first.startswith("Connected to ") and (
        first.endswith(" but greeting failed.") or " but connection died. " in first)


class ConnectTimeouts:
    """qmail's tcpto (spec §7.6), in memory: only connect *timeouts* count; a
    second one at least 120 s after the previous makes the address skipped
    for `skip_seconds` after the last; any connect that completes or is
    refused clears it. Saves every delivery to a black-holed MX the full
    timeoutconnect."""

    def __init__(self, skip_seconds: float, clock=time.monotonic, max_entries: int = 10_000) -> None:
        self._skip = skip_seconds
        self._clock = clock
        self._max = max_entries
        self._entries: dict[str, tuple[int, float]] = {}   # ip -> (count, last timeout)

    def skipped(self, ip: str) -> bool:
        entry = self._entries.get(ip)
        if entry is None or self._skip <= 0:
            return False
        count, last = entry
        if count >= 2 and self._clock() - last < self._skip:
            return True
        if self._clock() - last >= self._skip:
            del self._entries[ip]
        return False

    def timed_out(self, ip: str) -> None:
        now = self._clock()
        count, last = self._entries.get(ip, (0, 0.0))
        if count and now - last < 120:
            return          # too soon to count again (qmail)
        count = min(count + 1, 10)
        if ip not in self._entries and len(self._entries) >= self._max:
            del self._entries[next(iter(self._entries))]
        self._entries[ip] = (count, now)

    def reached(self, ip: str) -> None:
        self._entries.pop(ip, None)

    def clear(self) -> None:
        """qmail-tcpok: every address may be tried again."""
        self._entries.clear()


class RemoteConfigError(Exception):
    """control files or qrelay.toml unusable for remote delivery (one-line reason)."""


@dataclass(slots=True, frozen=True)
class RemoteConfig:
    """Snapshot of what remote delivery reads: control files + [delivery] settings."""
    helohost: str
    routes: SmtpRoutes = field(default_factory=SmtpRoutes)
    timeoutconnect: int = 60
    timeoutremote: int = 1200
    dns_servers: tuple[str, ...] = ()
    mx_port: int = 25
    max_messages_per_connection: int = 100
    max_connections_per_host: int = 20
    max_addresses_per_delivery: int = 30
    max_greeting_failures: int = 2
    idle_timeout: float = 30.0
    # ipme: our own addresses; "0.0.0.0" is always treated as ours (qmail).
    my_addresses: frozenset[str] = frozenset({"0.0.0.0"})
    dns_timeout: float = 5.0
    dns_tries: int = 2
    dns_negative_ttl: float = 300.0
    ipv6: bool = True
    timeout_skip_seconds: float = 3840.0
    tls: TlsDestinations = field(default_factory=TlsDestinations)
    tls_min_version: str = "TLSv1.2"
    tls_ca_file: str = ""
    tls_ciphers: str = ""          # control/tlsclientciphers
    tls_client_cert: str = ""      # control/clientcert.pem, when there is one
    # its (inode, size, mtime): a changed file makes a new courier on reload
    tls_client_cert_stamp: tuple = ()
    tls_handshake_timeout: float = 60.0


def load_remote_config(root: Path | str) -> RemoteConfig:
    """Build a RemoteConfig from ROOT/control (helohost, timeouts, smtproutes)
    and ROOT/qrelay.toml [delivery]. Raises RemoteConfigError (one line naming
    the file, and the line where there is one): a malformed smtproutes line or
    a timeout that is not a number is refused, never read the lenient way."""
    control = Path(root) / "control"
    try:
        me = read_line(control / "me")
        helohost = read_line(control / "helohost", me)
        if not helohost:
            raise RemoteConfigError("control/helohost and control/me are missing: no name for HELO")
        timeoutconnect = max(1, read_number(control / "timeoutconnect", 60))
        timeoutremote = max(1, read_number(control / "timeoutremote", 1200))
        routes = SmtpRoutes.load(control)
        settings = load_settings(root).delivery
        tls = TlsDestinations.load(root)
        tls_ciphers = read_client_ciphers(root)
        client_cert, client_cert_stamp = read_client_cert(root)
    except (ControlError, SettingsError, RoutesError, TlsPolicyError) as exc:
        raise RemoteConfigError(str(exc)) from None
    toml = Path(root) / "qrelay.toml"
    tls_ca_file = settings.tls_ca_file
    if tls_ca_file:
        tls_ca_file = str(Path(root) / tls_ca_file)   # an absolute path stays as it is
        if not Path(tls_ca_file).is_file():
            raise RemoteConfigError(f"{toml}: [delivery] tls_ca_file: no file {tls_ca_file}")
    for server in settings.dns_servers:
        if not _valid_dns_server(server):
            raise RemoteConfigError(
                f"{Path(root) / 'qrelay.toml'}: [delivery] dns_servers: {server!r} is not"
                " an IP address with an optional :port")
    mine = {"0.0.0.0", *settings.my_addresses}
    if settings.mx_port == 25:
        # qmail's ipme: an MX on one of this host's interfaces is this host,
        # when MX deliveries go to the port its own SMTP service answers on.
        mine |= host_addresses()
    return RemoteConfig(
        helohost=helohost, routes=routes, timeoutconnect=timeoutconnect,
        timeoutremote=timeoutremote, dns_servers=tuple(settings.dns_servers),
        mx_port=settings.mx_port,
        max_messages_per_connection=max(1, settings.max_messages_per_connection),
        max_connections_per_host=max(1, settings.max_connections_per_host),
        max_addresses_per_delivery=settings.max_addresses_per_delivery,
        max_greeting_failures=settings.max_greeting_failures,
        idle_timeout=settings.idle_timeout,
        my_addresses=frozenset(mine),
        dns_timeout=settings.dns_timeout, dns_tries=max(1, settings.dns_tries),
        dns_negative_ttl=float(settings.dns_negative_ttl), ipv6=settings.ipv6,
        timeout_skip_seconds=float(settings.timeout_skip_seconds),
        tls=tls, tls_min_version=settings.tls_min_version, tls_ca_file=tls_ca_file,
        tls_ciphers=tls_ciphers, tls_client_cert=client_cert,
        tls_client_cert_stamp=client_cert_stamp,
        tls_handshake_timeout=settings.tls_handshake_timeout)


class RemoteDelivery:
    """One per process/event loop; owns the DNS cache and the connection pool.

    `resolver`: an MxResolver, or an aiodns-like resolver for MxResolver to
    use; None = aiodns with `config.dns_servers`.
    """

    def __init__(self, config: RemoteConfig, *, resolver=None, clock=time.monotonic,
                 rng=None) -> None:
        self.config = config
        if resolver is not None and hasattr(resolver, "mx_targets"):
            self.resolver = resolver
        else:
            self.resolver = MxResolver(
                config.dns_servers, timeout=config.dns_timeout, tries=config.dns_tries,
                clock=clock, rng=rng, negative_ttl=config.dns_negative_ttl,
                ipv6=config.ipv6, resolver=resolver)
        self.pool = ConnectionPool(
            timeoutconnect=config.timeoutconnect, timeoutremote=config.timeoutremote,
            limits=PoolLimits(config.max_messages_per_connection,
                              config.max_connections_per_host, config.idle_timeout),
            clock=clock,
            tls_contexts=TlsContexts(config.tls_min_version, config.tls_ca_file,
                                     config.tls_ciphers, config.tls_client_cert),
            handshake_timeout=config.tls_handshake_timeout)
        self._clock = clock
        self.tcpto = ConnectTimeouts(config.timeout_skip_seconds, clock)

    async def targets(self, domain: str) -> tuple[list[MxTarget], int, str]:
        """Addresses to try for `domain`, best first, the port, and the name
        control/tlsdestinations is looked up by (the domain, or the relay).
        Raises ResolveError."""
        most = self.config.max_addresses_per_delivery
        route = self.config.routes.lookup(domain)
        if route is not None:
            # A relay is resolved by A/AAAA only and the ipme check is off (qmail).
            return (await self.resolver.relay_targets(route.relay))[:most], route.port, route.relay
        targets = await self.resolver.mx_targets(domain)
        return (_unique(apply_ipme(targets, self.config.my_addresses))[:most],
                self.config.mx_port, domain)

    async def deliver(self, domain: str, sender: str, recipients: Sequence[str],
                      message: bytes) -> list[RecipientResult]:
        """Deliver one message to recipients that share `domain`, in one
        transaction; one result per recipient, in the same order."""
        recipients = list(recipients)
        message = bytes(message)
        sender = wire_sender(sender)     # a double bounce's #@[] goes out as <>
        if not recipients:
            return []
        if _unsafe(sender) or _unsafe(domain):
            return _all(recipients, "D", TEXT_BAD_ADDRESS)
        bad = [_unsafe(r) for r in recipients]
        if any(bad):
            good = [r for r, b in zip(recipients, bad) if not b]
            sent = iter(await self.deliver(domain, sender, good, message) if good else [])
            return [RecipientResult(r, "D", TEXT_BAD_ADDRESS) if b else next(sent)
                    for r, b in zip(recipients, bad)]
        results, outcome = await self._transaction(domain, sender, recipients, message)
        # A server's limit of recipients per transaction answers 452 past it
        # (RFC 5321 4.5.3.1.10): once the message went to someone, the ones
        # refused with 452 go in the next transaction now, not at their next
        # retry. Each transaction must deliver to someone, so this ends.
        sent, got = list(range(len(recipients))), results
        while outcome is not None and any(r.status == "K" for r in got):
            sent = [sent[i] for i, reply in enumerate(outcome.rcpt) if reply.code == 452]
            if not sent:
                break
            got, outcome = await self._transaction(domain, sender,
                                                   [recipients[i] for i in sent], message)
            for i, result in zip(sent, got):
                results[i] = result
        return results

    async def _transaction(self, domain: str, sender: str, recipients: list[str],
                           message: bytes
                           ) -> tuple[list[RecipientResult], TransactionOutcome | None]:
        """One transaction (or none: no address, no connection...); the
        results, and the server's answers when it took place."""
        try:
            targets, port, tls_name = await self.targets(domain)
        except ResolveError as exc:
            return _all(recipients, exc.status, exc.text), None
        policy = self.config.tls.lookup(tls_name)
        port = policy.port or port
        last_failure: str | None = None
        greeting_failures = 0
        for target in targets:
            ip = target.ip
            if self.tcpto.skipped(ip):
                continue
            if greeting_failures >= self.config.max_greeting_failures:
                break       # each may have cost a timeoutremote: defer now
            # Idle connections the server dropped are met one by one; once
            # none is left the pool opens a fresh one, so this is bounded.
            retries = self.config.max_connections_per_host + 1
            while True:
                # SNI and the certificate's name: the MX (or relay) host name;
                # a relay or domain that is an IP literal ([1.2.3.4]) is its
                # address, checked against IP SANs and never sent as SNI.
                tls = TlsRequest(self.config.tls.for_host(policy, target.name),
                                 parse_ip_literal(target.name) or target.name)
                try:
                    conn, reused = await self.pool.acquire(ip, port, self.config.helohost, tls)
                except NoLocalResources:
                    return _all(recipients, "Z", TEXT_NO_RESOURCES), None
                except ConnectFailed as exc:
                    if exc.timed_out:
                        self.tcpto.timed_out(ip)
                    else:
                        self.tcpto.reached(ip)
                    break
                except GreetingFailed as exc:
                    self.tcpto.reached(ip)
                    greeting_failures += 1
                    last_failure = f"Connected to {ip} but greeting failed.\n" + _said(exc.reply)
                    break
                except ConnectionDied:
                    self.tcpto.reached(ip)
                    greeting_failures += 1
                    last_failure = f"Connected to {ip} but connection died. (#4.4.2)\n"
                    break
                except TlsFailed as exc:
                    # Required TLS not had here: the next address may do better.
                    self.tcpto.reached(ip)
                    last_failure = exc.text
                    break
                except NameRejected as exc:
                    self.tcpto.reached(ip)
                    return _all(recipients, "Z",
                                f"Connected to {ip} but my name was rejected.\n"
                                + _said(exc.reply)), None
                if not reused:
                    self.tcpto.reached(ip)
                try:
                    outcome = await conn.transaction(sender, recipients, message, self._clock)
                except ConnectionDied as exc:
                    self.pool.release(conn, reusable=False)
                    if reused and not exc.after_dot and retries > 0:
                        retries -= 1
                        continue   # an idle connection the server had dropped: retry
                    dup = "Possible duplicate! " if exc.after_dot else ""
                    return _all(recipients, "Z",
                                f"Connected to {ip} but connection died. {dup}(#4.4.2)\n"), None
                except BaseException:
                    self.pool.release(conn, reusable=False)
                    raise
                if reused and outcome.mail.code == 421 and retries > 0:
                    # The server closes this connection (e.g. its limit of
                    # messages per connection): not about this message.
                    self.pool.release(conn, reusable=False)
                    retries -= 1
                    continue
                self.pool.release(conn)
                return _results(ip, recipients, outcome, conn.tls is not None), outcome
        return _all(recipients, "Z", last_failure or TEXT_NO_CONNECTION), None

    def forget_timeouts(self) -> None:
        """`qrelay flush` (qmail-tcpok + ALRM): addresses skipped for their
        connect timeouts are tried again at once."""
        self.tcpto.clear()

    async def close(self) -> None:
        """QUIT and close pooled connections; close the DNS resolver."""
        await self.pool.close()
        await self.resolver.close()


def open_deliverer(root, settings=None, log=None) -> RemoteDelivery:
    """The remote channel's deliverer (engine.delivery.channels.CHANNELS)."""
    return RemoteDelivery(load_remote_config(root))


def _valid_dns_server(text: str) -> bool:
    """"1.2.3.4", "1.2.3.4:53", "::1" or "[::1]:53" (what c-ares accepts)."""
    host, port = text, ""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest and not rest.startswith(":"):
            return False
        port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _unique(targets: list[MxTarget]) -> list[MxTarget]:
    # One address listed under two MX names is tried once, at its best place.
    seen: set[str] = set()
    out = []
    for t in targets:
        if t.ip not in seen:
            seen.add(t.ip)
            out.append(t)
    return out


def _unsafe(address: str) -> bool:
    return "\r" in address or "\n" in address or "\0" in address


def _all(recipients: Sequence[str], status: str, text: str) -> list[RecipientResult]:
    return [RecipientResult(r, status, text) for r in recipients]


def _said(reply: Reply | None) -> str:
    return f"Remote host said: {reply.text}" if reply is not None else ""


def _letter(code: int) -> str:
    return "D" if code >= 500 else "Z"


def _results(ip: str, recipients: Sequence[str], outcome: TransactionOutcome,
             tls: bool = False) -> list[RecipientResult]:
    """qmail-remote's texts (spec §7.3), reduced per recipient as qmail-rspawn does."""
    mail = outcome.mail
    if mail.code >= 400:
        return _all(recipients, _letter(mail.code),
                    f"Connected to {ip} but sender was rejected.\n" + _said(mail))
    refused = {i: r for i, r in enumerate(outcome.rcpt) if r.code >= 400}
    if len(refused) == len(recipients):
        return [RecipientResult(addr, _letter(reply.code),
                                f"{ip} does not like recipient.\n" + _said(reply)
                                + f"Giving up on {ip}.\n")
                for addr, reply in zip(recipients, outcome.rcpt)]
    data, final = outcome.data, outcome.final
    if outcome.died:
        common = RecipientResult("", "Z", f"Connected to {ip} but connection died. (#4.4.2)\n")
    elif data is None or data.code // 100 != 3:     # a 2xx to DATA: smtpclient sent no body
        status = _letter(data.code) if data is not None else "Z"
        common = RecipientResult("", status, f"{ip} failed on DATA command.\n" + _said(data))
    elif final is not None and final.code >= 400:
        common = RecipientResult("", _letter(final.code),
                                 f"{ip} failed after I sent the message.\n" + _said(final))
    else:
        accepted = "TLS transmitted message accepted" if tls else "accepted message"
        common = RecipientResult("", "K", f"{ip} {accepted}.\n" + _said(final))
    out = []
    for i, addr in enumerate(recipients):
        reply = refused.get(i)
        if reply is not None:
            out.append(RecipientResult(addr, _letter(reply.code),
                                       f"{ip} does not like recipient.\n" + _said(reply)))
        else:
            out.append(RecipientResult(addr, common.status, common.text))
    return out
