"""The client's host name, for `settings.smtp.reverse_dns = true` (tcpserver without -H).

Owns one PTR lookup per connection, through c-ares (aiodns) at the servers of
`[delivery] dns_servers` (empty = resolv.conf), bounded by a timeout. Any
failure — NXDOMAIN, SERVFAIL, timeout — means "no name", as in tcpserver: the
client is then `unknown` and `=host` rules of tcp.smtp do not apply. Off by
default, so no connection ever waits for DNS unless the operator asks.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Sequence
from typing import Any

log = logging.getLogger("qrelay.smtpd")

_PTR = 12


class RemoteHostResolver:
    """PTR lookups; `resolver` (an aiodns.DNSResolver-like object with
    `query_dns(name, "PTR")`) may be injected by tests."""

    def __init__(self, dns_servers: Sequence[str] = (), timeout: float = 5.0, resolver: Any = None) -> None:
        self._servers = tuple(dns_servers)
        self._timeout = timeout
        self._resolver = resolver

    def _get_resolver(self) -> Any:
        if self._resolver is None:
            import aiodns
            import pycares
            self._resolver = aiodns.DNSResolver(
                nameservers=list(self._servers) or None, loop=asyncio.get_running_loop(),
                timeout=self._timeout, tries=1, flags=pycares.ARES_FLAG_NOSEARCH)
        return self._resolver

    async def lookup(self, ip: str) -> str | None:
        """The first PTR name of `ip` (no trailing dot), or None."""
        try:
            name = ipaddress.ip_address(ip).reverse_pointer
        except ValueError:
            return None
        try:
            result = await asyncio.wait_for(self._get_resolver().query_dns(name, "PTR"), self._timeout)
        except Exception as exc:  # NXDOMAIN, SERVFAIL, timeout: no name, as in tcpserver
            log.debug("no host name for %s: %s", ip, exc)
            return None
        for record in getattr(result, "answer", ()):
            if getattr(record, "type", None) == _PTR:
                dname = str(getattr(record.data, "dname", "")).rstrip(".")
                if dname:
                    return dname
        return None
