"""The client's host name, for `settings.smtp.reverse_dns = true` (tcpserver without -H).

Owns one PTR lookup per connection, through c-ares (aiodns) at the servers of
`[delivery] dns_servers` (empty = resolv.conf), bounded by a timeout. Any
failure — NXDOMAIN, SERVFAIL, timeout — means "no name", as in tcpserver: the
client is then `unknown` and `=host` rules of tcp.smtp do not apply. Off by
default, so no connection ever waits for DNS unless the operator asks.

A PTR record says what the owner of the client's address block wants it to
say: anyone may name their own address `mail.customer.example` and so match a
`=.customer.example:allow,RELAYCLIENT=""` rule. With `[smtp]
reverse_dns_paranoid` (default on: tcpserver -p, which tcpserver leaves off)
the name is kept only when its own A (or AAAA) records hold the client's
address; the same timeout bounds both lookups.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Sequence
from typing import Any

log = logging.getLogger("qrelay.smtpd")

_PTR = 12
_ADDRESS = {4: ("A", 1), 6: ("AAAA", 28)}


class RemoteHostResolver:
    """PTR lookups; `resolver` (an aiodns.DNSResolver-like object with
    `query_dns(name, "PTR")`) may be injected by tests."""

    def __init__(self, dns_servers: Sequence[str] = (), timeout: float = 5.0, resolver: Any = None,
                 paranoid: bool = True) -> None:
        self._servers = tuple(dns_servers)
        self._timeout = timeout
        self._resolver = resolver
        self._paranoid = paranoid

    def _get_resolver(self) -> Any:
        if self._resolver is None:
            import aiodns
            import pycares
            self._resolver = aiodns.DNSResolver(
                nameservers=list(self._servers) or None, loop=asyncio.get_running_loop(),
                timeout=self._timeout, tries=1, flags=pycares.ARES_FLAG_NOSEARCH)
        return self._resolver

    async def lookup(self, ip: str) -> str | None:
        """The first PTR name of `ip` (no trailing dot), or None; when paranoid,
        None also unless that name's addresses include `ip`."""
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return None
        try:
            async with asyncio.timeout(self._timeout):
                name = await self._ptr(address)
                if name and self._paranoid and not await self._confirms(name, address):
                    log.debug("host name %s of %s: its addresses do not include it", name, ip)
                    return None
                return name
        except Exception as exc:  # NXDOMAIN, SERVFAIL, timeout: no name, as in tcpserver
            log.debug("no host name for %s: %s", ip, exc)
            return None

    async def _ptr(self, address) -> str | None:
        result = await self._get_resolver().query_dns(address.reverse_pointer, "PTR")
        for record in getattr(result, "answer", ()):
            if getattr(record, "type", None) == _PTR:
                dname = str(getattr(record.data, "dname", "")).rstrip(".")
                if dname:
                    return dname
        return None

    async def _confirms(self, name: str, address) -> bool:
        """Do `name`'s A (IPv4) or AAAA (IPv6) records hold `address`?"""
        qtype, number = _ADDRESS[address.version]
        result = await self._get_resolver().query_dns(name, qtype)
        for record in getattr(result, "answer", ()):
            if getattr(record, "type", None) == number:
                try:
                    if ipaddress.ip_address(record.data.addr) == address:
                        return True
                except (AttributeError, ValueError):
                    continue
        return False
