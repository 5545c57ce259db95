"""MX / A / AAAA resolution for remote delivery (spec §7.1), with aiodns.

`MxResolver` owns the DNS answer cache (by TTL, with an injectable clock) and
turns a mail domain into the ordered list of addresses qmail-remote would try:

- a domain that is an IP literal (`1.2.3.4`, `[1.2.3.4]`, `[IPv6:…]`) is used
  as is, preference 0, no DNS;
- MX records sorted by preference, **random order among equal preferences**
  (as qmail), each exchanger resolved to its A then AAAA records;
- no MX (NXDOMAIN or no MX records) → the domain's own A/AAAA records;
- a null MX (RFC 7505, exchanger ".") → permanent failure;
- `apply_ipme` drops our own addresses and everything not better than them;
  `host_addresses` are this host's own (every interface's, as qmail's ipme).

c-ares keeps its own TTL-bounded query cache underneath; ours adds the
injectable clock, a bound on negative answers (`negative_ttl`), a size bound,
and one query on the wire for many concurrent deliveries to one domain.

Failures are raised as `ResolveError(status, text)` with qmail-remote's texts
("Z" temporary, "D" permanent). This module never connects to a mail host,
and it never reads control files.
"""
from __future__ import annotations

import asyncio
import ipaddress
import itertools
import random
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

TEXT_DNS_SOFT = "Sorry, I couldn't find any host by that name. (#4.1.2)\n"
TEXT_NO_MX_OR_IP = "Sorry, I couldn't find a mail exchanger or IP address. (#5.4.4)\n"
TEXT_IPME = ("Sorry. Although I'm listed as a best-preference MX or A for that host,\n"
             "it isn't in my control/locals file, so I don't treat it as local. (#5.4.6)\n")

# DNS answer classes, as the cache keeps them.
_NXDOMAIN = "NXDOMAIN"
_NODATA = "NODATA"
_QTYPE_NUM = {"A": 1, "MX": 15, "AAAA": 28}
# Records kept from one answer: about what a 512-byte answer holds (all that
# qmail 1.03 could read). A domain's own DNS decides how many MX records and
# addresses there are; over TCP one answer may hold thousands, and every MX
# host is looked up.
MAX_ANSWER_RECORDS = 32


def text_no_such_host(host: str) -> str:
    return f"Sorry, I couldn't find any host named {host}. (#5.1.2)\n"


def text_null_mx(domain: str) -> str:
    return f"Sorry, {domain} does not accept mail (null MX). (#5.1.10)\n"


class ResolveError(Exception):
    """No address to deliver to: status "Z" (try later) or "D" (give up), qmail text."""

    def __init__(self, status: str, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


class DnsTemporaryError(Exception):
    """SERVFAIL, timeout, refused…: the answer may be different later."""


@dataclass(slots=True, frozen=True)
class MxTarget:
    """One address to try, with the MX preference it came from."""
    ip: str
    preference: int
    name: str


def parse_ip_literal(host: str) -> str | None:
    """The address in `1.2.3.4`, `[1.2.3.4]` or `[IPv6:…]`; None if host is a name."""
    text = host
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
        if text[:5].lower() == "ipv6:":
            text = text[5:]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def apply_ipme(targets: Sequence[MxTarget], my_addresses: Iterable[str]) -> list[MxTarget]:
    """qmail's ipme rule: keep only targets preferred over our own best entry.

    Raises ResolveError(D, #5.4.6) when that leaves nothing (we are the best
    MX for a domain we do not treat as local: delivering would loop).
    """
    mine = set(my_addresses)
    own = [t.preference for t in targets if _ipme_form(t.ip) in mine]
    if not own:
        return list(targets)
    best_own = min(own)
    kept = [t for t in targets if t.preference < best_own]
    if not kept:
        raise ResolveError("D", TEXT_IPME)
    return kept


def _ipme_form(ip: str) -> str:
    """A target as ipme compares it: an IPv4-mapped address (an AAAA
    record's ::ffff:127.0.0.1 reaches 127.0.0.1) as its IPv4 form, and `::`,
    which reaches this host as 0.0.0.0 does, as 0.0.0.0."""
    if ":" not in ip:
        return ip
    try:
        address = ipaddress.IPv6Address(ip)
    except ValueError:
        return ip
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return "0.0.0.0" if address.is_unspecified else ip


def host_addresses() -> frozenset[str]:
    """This host's addresses as qmail's ipme finds them: each interface's
    IPv4 and IPv6 addresses (psutil reads them, aliases and all), 127.0.0.1
    and 0.0.0.0; in the form DNS answers compare with."""
    import socket

    import psutil
    found = {"0.0.0.0", "127.0.0.1"}
    try:
        interfaces = psutil.net_if_addrs()
    except OSError:
        interfaces = {}
    for addrs in interfaces.values():
        for a in addrs:
            if a.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            try:        # fe80::1%eth0: the zone is not part of an answer
                found.add(ipaddress.ip_address(a.address.partition("%")[0]).compressed)
            except ValueError:
                pass
    return frozenset(found)


class _CacheEntry:
    __slots__ = ("expires", "value")

    def __init__(self, expires: float, value: tuple | str) -> None:
        self.expires = expires
        self.value = value


class MxResolver:
    """Resolves mail domains to delivery addresses; caches DNS answers by TTL.

    `dns_servers`: "host:port" strings (empty = the system's resolv.conf).
    `resolver`: an aiodns.DNSResolver-like object with `query_dns(name, type)`
    (tests may inject one). `rng` orders equal preferences (injectable for
    tests). `negative_ttl` caps how long NXDOMAIN/NODATA answers are kept.
    `max_records`: records kept from one answer (the best preferences of an
    MX answer, the first addresses of an A or AAAA answer).
    """

    def __init__(self, dns_servers: Sequence[str] = (), *, timeout: float = 5.0, tries: int = 2,
                 clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None,
                 negative_ttl: float = 60.0, max_cache_entries: int = 100_000,
                 ipv6: bool = True, max_records: int = MAX_ANSWER_RECORDS,
                 resolver=None) -> None:
        self._servers = tuple(dns_servers)
        self._timeout = timeout
        self._tries = tries
        self._clock = clock
        self._rng = rng or random.Random()
        self._negative_ttl = negative_ttl
        self._max_entries = max_cache_entries
        self._ipv6 = ipv6
        self._max_records = max_records
        self._resolver = resolver
        self._owns_resolver = resolver is None
        self._cache: dict[tuple[str, str], _CacheEntry] = {}
        # One query on the wire per (name, type) however many deliveries ask.
        self._inflight: dict[tuple[str, str], asyncio.Future] = {}

    # --- raw, cached queries ---------------------------------------------

    def _get_resolver(self):
        if self._resolver is None:
            import aiodns
            import pycares
            kwargs = {"timeout": self._timeout, "tries": self._tries,
                      "flags": pycares.ARES_FLAG_NOSEARCH}
            self._resolver = aiodns.DNSResolver(
                nameservers=list(self._servers) or None, loop=asyncio.get_running_loop(), **kwargs)
        return self._resolver

    async def query(self, name: str, qtype: str) -> tuple | str:
        """Records of `qtype` for `name` (the data objects, with `.ttl` known to
        the cache), or the string NXDOMAIN / NODATA. Raises DnsTemporaryError."""
        key = (name.lower().rstrip("."), qtype)
        now = self._clock()
        entry = self._cache.get(key)
        if entry is not None:
            if entry.expires > now:
                return entry.value
            del self._cache[key]
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        fut = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            value, ttl = await self._ask(key[0], qtype)
        except asyncio.CancelledError:
            fut.cancel()
            raise
        except BaseException as exc:
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # mark retrieved: nobody may be waiting
            raise
        else:
            fut.set_result(value)
            if ttl > 0:
                self._store(key, value, self._clock() + ttl)
            return value
        finally:
            self._inflight.pop(key, None)

    async def _ask(self, name: str, qtype: str) -> tuple[tuple | str, float]:
        import aiodns
        import pycares
        try:
            result = await self._get_resolver().query_dns(name, qtype)
        except UnicodeError:
            # Not a DNS name at all (bytes that are not UTF-8, a label IDNA
            # refuses): no such host, as qmail's lookup of those bytes finds.
            return _NXDOMAIN, self._negative_ttl
        except aiodns.error.DNSError as exc:
            code = exc.args[0] if exc.args else None
            if code in (pycares.errno.ARES_ENOTFOUND, pycares.errno.ARES_EBADNAME):
                # EBADNAME: a name DNS cannot carry (a label over 63 bytes, an
                # empty label, a space), never asked: qmail's lookup fails
                # hard there too.
                return _NXDOMAIN, self._negative_ttl
            if code == pycares.errno.ARES_ENODATA:
                return _NODATA, self._negative_ttl
            raise DnsTemporaryError(f"{name}/{qtype}: {exc.args[-1] if exc.args else exc}") from None
        want = _QTYPE_NUM[qtype]
        records = tuple(r for r in result.answer if r.type == want)
        if not records:
            return _NODATA, self._negative_ttl
        if qtype == "MX":
            records = tuple(sorted(records, key=lambda r: r.data.priority))
        records = records[:self._max_records]
        ttl = min(r.ttl for r in records)
        return tuple(r.data for r in records), ttl

    def _store(self, key: tuple[str, str], value: tuple | str, expires: float) -> None:
        if len(self._cache) >= self._max_entries:
            # Full: drop what expired, then the oldest down to nine tenths, so the
            # O(n) sweep runs once per tenth of max_entries insertions, not on
            # every one (as when each sweep found just one entry expired).
            now = self._clock()
            for k in [k for k, e in self._cache.items() if e.expires <= now]:
                del self._cache[k]
            excess = len(self._cache) - self._max_entries * 9 // 10
            if excess > 0:
                for k in list(itertools.islice(self._cache, excess)):
                    del self._cache[k]
        self._cache[key] = _CacheEntry(expires, value)

    # --- addresses of one host -------------------------------------------

    async def host_addresses(self, host: str) -> list[str]:
        """A then AAAA addresses of a host name (or the IP of a literal).

        Returns [] when the name exists without addresses; raises
        ResolveError(D, #5.1.2) when it does not exist, DnsTemporaryError on
        a temporary failure with no address found.
        """
        literal = parse_ip_literal(host)
        if literal is not None:
            return [literal]
        qtypes = ("A", "AAAA") if self._ipv6 else ("A",)
        answers = await asyncio.gather(*(self.query(host, t) for t in qtypes),
                                       return_exceptions=True)
        addresses: list[str] = []
        soft = False
        nxdomain = False
        for answer in answers:
            if isinstance(answer, DnsTemporaryError):
                soft = True
            elif isinstance(answer, BaseException):
                raise answer
            elif answer == _NXDOMAIN:
                nxdomain = True
            elif answer != _NODATA:
                addresses.extend(str(ipaddress.ip_address(r.addr)) for r in answer)
        if addresses:
            return addresses
        if soft:
            raise DnsTemporaryError(f"{host}: temporary failure")
        if nxdomain:
            raise ResolveError("D", text_no_such_host(host))
        return []

    # --- a mail domain -----------------------------------------------------

    async def relay_targets(self, relay: str) -> list[MxTarget]:
        """Addresses of an smtproutes relay: A/AAAA only, never MX (qmail)."""
        try:
            addresses = await self.host_addresses(relay)
        except DnsTemporaryError:
            raise ResolveError("Z", TEXT_DNS_SOFT) from None
        if not addresses:
            raise ResolveError("D", TEXT_NO_MX_OR_IP)
        return [MxTarget(ip, 0, relay) for ip in addresses]

    async def mx_targets(self, domain: str) -> list[MxTarget]:
        """Addresses to try for a mail domain, best first (spec §7.1)."""
        literal = parse_ip_literal(domain)
        if literal is not None:
            return [MxTarget(literal, 0, domain)]
        try:
            answer = await self.query(domain, "MX")
        except DnsTemporaryError:
            raise ResolveError("Z", TEXT_DNS_SOFT) from None
        if answer in (_NXDOMAIN, _NODATA):
            return await self._implicit_mx(domain)
        exchangers = [(r.priority, r.exchange.rstrip(".")) for r in answer]
        real = [(p, name) for p, name in exchangers if name]
        if not real:
            raise ResolveError("D", text_null_mx(domain))
        ordered = self._order(real)
        results = await asyncio.gather(*(self.host_addresses(name) for _, name in ordered),
                                       return_exceptions=True)
        targets: list[MxTarget] = []
        soft = False
        for (pref, name), result in zip(ordered, results):
            if isinstance(result, DnsTemporaryError):
                soft = True  # qmail: skip this MX, but a total miss is temporary
            elif isinstance(result, ResolveError):
                continue     # exchanger does not exist: skip it
            elif isinstance(result, BaseException):
                raise result
            else:
                targets.extend(MxTarget(ip, pref, name) for ip in result)
        if not targets:
            raise ResolveError("Z", TEXT_DNS_SOFT) if soft else ResolveError("D", TEXT_NO_MX_OR_IP)
        return targets

    async def _implicit_mx(self, domain: str) -> list[MxTarget]:
        try:
            addresses = await self.host_addresses(domain)
        except DnsTemporaryError:
            raise ResolveError("Z", TEXT_DNS_SOFT) from None
        if not addresses:
            raise ResolveError("D", TEXT_NO_MX_OR_IP)
        return [MxTarget(ip, 0, domain) for ip in addresses]

    def _order(self, exchangers: list[tuple[int, str]]) -> list[tuple[int, str]]:
        # Shuffle first, then a stable sort by preference: random among equals.
        shuffled = list(exchangers)
        self._rng.shuffle(shuffled)
        shuffled.sort(key=lambda e: e[0])
        return shuffled

    def cache_size(self) -> int:
        return len(self._cache)

    async def close(self) -> None:
        if self._resolver is not None and self._owns_resolver:
            await self._resolver.close()
        self._resolver = None
