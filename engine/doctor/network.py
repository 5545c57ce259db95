"""`qrelay doctor ROOT DOMAIN`: the guide's `dig mx` and `telnet mx 25`, and
what qrelay itself holds for the domain.

- how qrelay routes it: local (locals / virtualdomains), an smtproutes
  relay, or its MX records, resolved through `[delivery] dns_servers` with
  the scheduler's own code (engine.delivery.mx, ipme included);
- each address in the order delivery would try it: connect, greeting and
  EHLO (each bounded by `[doctor] connect_timeout`), then QUIT — no MAIL,
  nothing is ever sent;
- qmail's tcpto table (queue/lock/tcpto, when this root is a qmail home)
  for those addresses: qrelay's own is in the running scheduler's memory;
- the recipients of the domain waiting in the queue, with the last error.
"""
from __future__ import annotations

import asyncio
import ipaddress
import struct
import time

from engine.doctor import Context, Report, ago

TCPTO_FILE = "queue/lock/tcpto"


def check(ctx: Context, report: Report, domain: str) -> None:
    from engine.delivery.remote import RemoteConfigError, load_remote_config
    from engine.delivery.service import DeliveryConfigError, load_delivery_config
    root = ctx.root
    try:
        delivery = load_delivery_config(root)
        config = load_remote_config(root)
    except (DeliveryConfigError, RemoteConfigError) as exc:
        report.problem("network", str(exc), "remote delivery does not start",
                       f"qrelay doctor {ctx.arg(root)}")
        return
    channel, _ = delivery.domains.resolve(f"postmaster@{domain}")
    if channel == "local":
        report.note("network", f"{domain} is delivered here (locals or virtualdomains): "
                    "its MX records should point at this host", local=True)
    asyncio.run(_remote(ctx, report, domain, config))
    _queue(ctx, report, domain)


async def _remote(ctx: Context, report: Report, domain: str, config) -> None:
    from engine.delivery.mx import MxResolver, ResolveError, DnsTemporaryError
    from engine.delivery.remote import RemoteDelivery
    resolver = MxResolver(config.dns_servers, timeout=config.dns_timeout, tries=config.dns_tries,
                          ipv6=config.ipv6)
    servers = ", ".join(config.dns_servers) or "the system's resolver"
    try:
        route = config.routes.lookup(domain)
        if route is not None:
            report.note("network", f"smtproutes: {domain} goes to {route.relay} port {route.port}"
                        " (no MX lookup)", relay=route.relay, port=route.port)
        else:
            try:
                answer = await resolver.query(domain, "MX")
            except DnsTemporaryError:
                answer = None
            if isinstance(answer, tuple):
                for r in sorted(answer, key=lambda r: r.priority):
                    report.note("network", f"MX {r.priority} {r.exchange.rstrip('.') or '.'} "
                                f"(via {servers})", preference=r.priority,
                                exchange=r.exchange.rstrip("."))
            elif answer is not None:
                report.note("network", f"{domain} has no MX records ({answer}): its own "
                            "A/AAAA records are used")
        try:
            targets, port = (await RemoteDelivery(config, resolver=resolver).targets(domain))[:2]
        except ResolveError as exc:
            soft = exc.status == "Z"
            report.problem("network", f"{domain}: {exc.text.strip()} (via {servers})",
                           "its mail defers until DNS answers" if soft else
                           "its mail bounces", f"dig mx {domain}" + (
                               _dig_server(config.dns_servers[0]) if config.dns_servers else ""))
            return
        reached = 0
        seen: set[str] = set()
        for target in targets:
            if target.ip in seen:
                continue
            seen.add(target.ip)
            reached += await _probe(ctx, report, domain, target, port, config.helohost)
        if targets and not reached:
            report.problem("network", f"no address of {domain} accepted a connection and EHLO",
                           "all its mail defers (#4.4.1) until one does",
                           f"qrelay flush {ctx.arg(ctx.root)} (once it answers)")
        _tcpto(ctx, report, [t.ip for t in targets])
    finally:
        await resolver.close()


def _dig_server(server: str) -> str:
    """dig's ` @HOST [-p PORT]` for a `dns_servers` entry: "host", "host:port",
    "[v6]:port" or a bare IPv6 address."""
    host, port = server, ""
    if server.startswith("["):
        host, _, rest = server[1:].partition("]")
        port = rest[1:]
    elif server.count(":") == 1:
        host, port = server.split(":")
    return f" @{host}" + (f" -p {port}" if port and port != "53" else "")


async def _probe(ctx: Context, report: Report, domain: str, target, port: int,
                 helohost: str) -> int:
    """Connect, greeting, EHLO, QUIT; 1 if the host would take mail."""
    from engine.delivery.smtpclient import MAX_REPLY_LINE, SmtpConnection, SmtpError
    timeout = ctx.doctor.connect_timeout
    where = f"{target.ip} port {port} ({target.name}, preference {target.preference})"
    started = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(target.ip, port, limit=MAX_REPLY_LINE), timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        why = "timed out" if isinstance(exc, (asyncio.TimeoutError, TimeoutError)) else \
            (exc.strerror or str(exc))
        report.problem("network", f"connect to {where}: {why} after "
                       f"{time.monotonic() - started:.1f} s",
                       "delivery tries the next address; when none answers the mail defers "
                       "(#4.4.1)" + ("; two timeouts 120 s apart make qrelay skip this "
                                     "address for [delivery] timeout_skip_seconds"
                                     if why == "timed out" else ""),
                       f"nc -v {target.ip} {port} (a firewall between, or the MX is down)")
        return 0
    conn = SmtpConnection(target.ip, port, helohost, reader, writer, timeout)
    try:
        greeting = await conn.read_reply()
        if greeting.code != 220:
            report.problem("network", f"{where} greets with {_first(greeting.text)}",
                           "qrelay tries the next address (qmail would defer)",
                           f"nc -v {target.ip} {port}")
            return 0
        ehlo = await conn.command(b"EHLO " + helohost.encode("utf-8", "surrogateescape"))
        if ehlo.code != 250:
            report.problem("network", f"{where} answers EHLO {helohost} with "
                           f"{_first(ehlo.text)}", "delivery falls back to HELO or defers",
                           f"echo {helohost} > {ctx.arg(ctx.root / 'control' / 'helohost')} "
                           "(a name that resolves to this host)")
            return 0
        try:
            await conn.command(b"QUIT")     # politely; its answer does not matter
        except SmtpError:
            pass
        extensions = [line[4:].strip() for line in ehlo.text.splitlines()[1:]]
        report.note("network", f"{where}: {_first(greeting.text)}; EHLO: "
                    + (", ".join(extensions) or "250"),
                    ip=target.ip, port=port, greeting=greeting.text.strip(),
                    extensions=extensions)
        return 1
    except SmtpError as exc:
        report.problem("network", f"{where}: {exc}", "delivery tries the next address",
                       f"nc -v {target.ip} {port}")
        return 0
    finally:
        await conn.quit(wait=timeout)


def _first(text: str) -> str:
    return text.strip().split("\n", 1)[0]


def _tcpto(ctx: Context, report: Report, ips: list[str]) -> None:
    """qmail's tcpto (spec §7.6): 64 records of 16 bytes, IPv4 + count + time."""
    try:
        data = (ctx.root / TCPTO_FILE).read_bytes()
    except OSError:
        report.note("network", "tcpto: qrelay keeps its connect-timeout table in the running "
                    "scheduler's memory (no file to read; `qrelay flush` empties it)")
        return
    wanted = {ip for ip in ips if "." in ip}
    for i in range(0, len(data) - 15, 16):
        ip = str(ipaddress.IPv4Address(data[i:i + 4]))
        count = data[i + 4]
        (when,) = struct.unpack_from("<I", data, i + 8)
        if ip in wanted and count:
            age = ctx.now - when
            line = f"{ip} timed out {int(age)} seconds ago; # recent timeouts: {count}"
            if count >= 2 and age < 3840:
                report.problem("network", f"tcpto: {line}",
                               "qmail-remote skips this address for up to 1.6 h",
                               "qmail-tcpok (then qrelay flush)")
            else:
                report.note("network", f"tcpto: {line}")


def _queue(ctx: Context, report: Report, domain: str) -> None:
    from contextlib import ExitStack

    from engine.queue import SpoolError
    from engine.queue.health import queue_health
    from engine.queue.spool import owners_spool
    if not (ctx.root / "queue" / "index" / "data.mdb").exists():
        return
    with ExitStack() as stack:
        try:
            spool = stack.enter_context(owners_spool(ctx.root / "queue", ctx.settings.spool,
                                                     readonly=True))
        except (SpoolError, OSError):
            return      # the no-argument check reports an unreadable spool
        health = queue_health(spool, 0, domain)
    for d in health.destinations:
        report.note("network", f"queue: {d.deferred} recipients at {domain} deferred, next "
                    f"retry in {ago(d.next_try - ctx.now)}; last error: {d.last_error.strip()}",
                    deferred=d.deferred, last_error=d.last_error)
    if not health.destinations:
        report.note("network", f"queue: nothing deferred for {domain}", deferred=0)
