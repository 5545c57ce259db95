"""MxResolver against a fake DNS server (dnslib): order, fallback, errors, cache."""
from __future__ import annotations

import asyncio
import random
from types import SimpleNamespace

import pytest

from engine.delivery.mx import (TEXT_DNS_SOFT, TEXT_IPME, TEXT_NO_MX_OR_IP, MxResolver,
                                MxTarget, ResolveError, apply_ipme, parse_ip_literal,
                                text_no_such_host, text_null_mx)
from tests.fakedns import fake_dns  # noqa: F401  (fixture)

ZONE = {
    "mx.test": {"MX": [(20, "b.mx.test"), (10, "a.mx.test")], "ttl": 100},
    "a.mx.test": {"A": ["127.0.0.2", "127.0.0.3"]},
    "b.mx.test": {"A": ["127.0.0.4"], "AAAA": ["::1"]},
    "noarecord.test": {"MX": [(10, "gone.test"), (20, "a.mx.test")]},
    "plain.test": {"A": ["127.0.0.5"]},
    "alias.test": {"CNAME": "plain.test"},
    "nullmx.test": {"MX": [(0, ".")]},
    "broken.test": "SERVFAIL",
    "softmx.test": {"MX": [(10, "broken.test")]},
    "empty.test": {"TXT": []},
    "mxempty.test": {"MX": [(10, "empty.test")]},
}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def resolver(dns, **kw) -> MxResolver:
    kw.setdefault("timeout", 0.5)
    kw.setdefault("tries", 1)
    return MxResolver([dns.address], **kw)


async def _mx(dns, domain, **kw):
    r = resolver(dns, **kw)
    try:
        return await r.mx_targets(domain)
    finally:
        await r.close()


def test_preference_order_and_all_addresses(fake_dns):
    fake_dns.zone.update(ZONE)
    targets = run(_mx(fake_dns, "mx.test"))
    assert targets == [MxTarget("127.0.0.2", 10, "a.mx.test"), MxTarget("127.0.0.3", 10, "a.mx.test"),
                       MxTarget("127.0.0.4", 20, "b.mx.test"), MxTarget("::1", 20, "b.mx.test")]


def test_ipv6_off(fake_dns):
    fake_dns.zone.update(ZONE)
    targets = run(_mx(fake_dns, "mx.test", ipv6=False))
    assert [t.ip for t in targets] == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]


def test_equal_preferences_in_random_order(fake_dns):
    fake_dns.zone["eq.test"] = {"MX": [(10, f"h{i}.eq.test") for i in range(6)] + [(5, "first.eq.test")]}
    for i in range(6):
        fake_dns.zone[f"h{i}.eq.test"] = {"A": [f"127.0.1.{i}"]}
    fake_dns.zone["first.eq.test"] = {"A": ["127.0.2.1"]}

    async def orders():
        r = resolver(fake_dns, rng=random.Random(1))
        try:
            return [tuple(t.ip for t in await r.mx_targets("eq.test")) for _ in range(12)]
        finally:
            await r.close()
    seen = run(orders())
    assert all(o[0] == "127.0.2.1" for o in seen)          # best preference always first
    assert all(sorted(o[1:]) == [f"127.0.1.{i}" for i in range(6)] for o in seen)
    assert len(set(seen)) > 1                               # equal ones shuffled


def test_a_fallback_when_no_mx_and_cname_followed(fake_dns):
    fake_dns.zone.update(ZONE)
    assert run(_mx(fake_dns, "plain.test")) == [MxTarget("127.0.0.5", 0, "plain.test")]
    assert run(_mx(fake_dns, "alias.test")) == [MxTarget("127.0.0.5", 0, "alias.test")]


def _error(dns, domain, **kw) -> ResolveError:
    with pytest.raises(ResolveError) as info:
        run(_mx(dns, domain, **kw))
    return info.value


def test_nxdomain_is_permanent(fake_dns):
    err = _error(fake_dns, "nowhere.test")
    assert (err.status, err.text) == ("D", text_no_such_host("nowhere.test"))
    assert err.text == "Sorry, I couldn't find any host named nowhere.test. (#5.1.2)\n"


def test_a_name_dns_cannot_carry_is_no_such_host(fake_dns):
    # A label over 63 bytes, an empty label, a space: c-ares refuses to ask
    # (EBADNAME). qmail's res_query fails hard on those: #5.1.2 at once, not
    # a #4.1.2 deferral repeated until the queue lifetime ends.
    for domain in ("a" * 64 + ".test", "a..test", "exa mple.test", "x" * 250 + ".test"):
        err = _error(fake_dns, domain)
        assert (err.status, err.text) == ("D", text_no_such_host(domain))
    fake_dns.zone["badmx.test"] = {"MX": [(10, "bad name.test"), (20, "b.mx.test")]}
    fake_dns.zone["b.mx.test"] = {"A": ["127.0.0.4"]}
    assert [t.ip for t in run(_mx(fake_dns, "badmx.test", ipv6=False))] == ["127.0.0.4"]
    assert fake_dns.queries == [("badmx.test", "MX"), ("b.mx.test", "A")]


def test_null_mx_is_permanent(fake_dns):
    fake_dns.zone.update(ZONE)
    err = _error(fake_dns, "nullmx.test")
    assert (err.status, err.text) == ("D", text_null_mx("nullmx.test"))


def test_servfail_is_temporary(fake_dns):
    fake_dns.zone.update(ZONE)
    err = _error(fake_dns, "broken.test")
    assert (err.status, err.text) == ("Z", TEXT_DNS_SOFT)
    assert err.text == "Sorry, I couldn't find any host by that name. (#4.1.2)\n"


def test_dns_timeout_is_temporary(fake_dns):
    fake_dns.zone["slow.test"] = "TIMEOUT"
    err = _error(fake_dns, "slow.test", timeout=0.2)
    assert err.status == "Z" and err.text == TEXT_DNS_SOFT


def test_mx_whose_host_fails_temporarily_only(fake_dns):
    fake_dns.zone.update(ZONE)
    err = _error(fake_dns, "softmx.test")
    assert err.status == "Z"


def test_mx_without_addresses_and_name_without_a(fake_dns):
    fake_dns.zone.update(ZONE)
    assert _error(fake_dns, "mxempty.test").text == TEXT_NO_MX_OR_IP
    assert _error(fake_dns, "empty.test").text == TEXT_NO_MX_OR_IP
    assert _error(fake_dns, "empty.test").status == "D"


def test_missing_exchanger_skipped(fake_dns):
    fake_dns.zone.update(ZONE)
    targets = run(_mx(fake_dns, "noarecord.test", ipv6=False))
    assert [t.ip for t in targets] == ["127.0.0.2", "127.0.0.3"]


def test_ip_literals_need_no_dns(fake_dns):
    assert run(_mx(fake_dns, "[127.0.0.9]")) == [MxTarget("127.0.0.9", 0, "[127.0.0.9]")]
    assert run(_mx(fake_dns, "127.0.0.9"))[0].ip == "127.0.0.9"
    assert parse_ip_literal("[IPv6:::1]") == "::1"
    assert parse_ip_literal("example.test") is None
    assert fake_dns.queries == []


def test_relay_targets_use_a_only(fake_dns):
    fake_dns.zone.update(ZONE)

    async def go():
        r = resolver(fake_dns, ipv6=False)
        try:
            return await r.relay_targets("mx.test")
        finally:
            await r.close()
    with pytest.raises(ResolveError) as info:
        run(go())   # mx.test has MX records but no A: a relay never uses MX
    assert info.value.status == "D"
    assert ("mx.test", "MX") not in fake_dns.queries


def test_huge_answers_are_bounded(fake_dns):
    # 100 MX records of 50 addresses each: the best 32 exchangers are
    # resolved, 32 addresses each kept (about what a 512-byte answer, all
    # qmail 1.03 could read, holds), not 200 queries and 5000 targets.
    fake_dns.zone["huge.test"] = {"MX": [(99 - i, f"h{99 - i}.huge.test") for i in range(100)]}
    for i in range(100):
        fake_dns.zone[f"h{i}.huge.test"] = {"A": [f"127.1.{i}.{j}" for j in range(50)]}
    targets = run(_mx(fake_dns, "huge.test", ipv6=False))
    assert len(targets) == 32 * 32
    assert {t.preference for t in targets} == set(range(32))
    assert [t.ip for t in targets if t.preference == 0] == [f"127.1.0.{j}" for j in range(32)]
    assert len(fake_dns.queries) == 1 + 32


class StubDns:
    """An aiodns-like resolver answering from a dict; counts questions."""

    def __init__(self, answers: dict) -> None:
        self.answers = answers
        self.asked: list[tuple[str, str]] = []

    async def query_dns(self, name, qtype):
        self.asked.append((name, qtype))
        num = {"A": 1, "MX": 15, "AAAA": 28}[qtype]
        records = []
        for ttl, data in self.answers.get((name, qtype), []):
            if qtype == "MX":
                data = SimpleNamespace(priority=data[0], exchange=data[1])
            else:
                data = SimpleNamespace(addr=data)
            records.append(SimpleNamespace(type=num, ttl=ttl, data=data))
        if not records:
            import aiodns
            import pycares
            raise aiodns.error.DNSError(pycares.errno.ARES_ENODATA, "no data")
        return SimpleNamespace(answer=records)

    async def close(self):
        pass


def test_cache_by_ttl_with_injected_clock():
    clock = Clock()
    stub = StubDns({("d.test", "MX"): [(100, (10, "h.d.test"))],
                    ("h.d.test", "A"): [(30, "127.0.0.2")]})

    async def go():
        r = MxResolver(clock=clock, ipv6=False, resolver=stub, negative_ttl=5)
        out = [await r.mx_targets("d.test")]
        clock.now += 29                       # both still fresh
        out.append(await r.mx_targets("d.test"))
        asked_fresh = len(stub.asked)
        clock.now += 2                        # A (ttl 30) expired, MX (ttl 100) not
        stub.answers[("h.d.test", "A")] = [(30, "127.0.0.3")]
        out.append(await r.mx_targets("d.test"))
        await r.close()
        return out, asked_fresh
    out, asked_fresh = run(go())
    assert asked_fresh == 2
    assert stub.asked == [("d.test", "MX"), ("h.d.test", "A"), ("h.d.test", "A")]
    assert [t.ip for t in out[0]] == [t.ip for t in out[1]] == ["127.0.0.2"]
    assert [t.ip for t in out[2]] == ["127.0.0.3"]


def test_a_full_cache_is_not_walked_at_every_answer():
    """At max_cache_entries a sweep walks the whole cache: it must free a
    tenth of it, not only what expired. When each answer found one entry
    expired (TTLs spread over time, as they are), every answer walked all
    100,000 entries."""
    clock = Clock()
    r = MxResolver(clock=clock, resolver=StubDns({}), max_cache_entries=100)
    walks = []

    class Counting(dict):
        def items(self):
            walks.append(len(self))
            return super().items()

    r._cache = Counting()
    for i in range(100):            # expiring one by one, a second apart
        r._store((f"old{i}.test", "A"), "NODATA", clock.now + i + 0.5)
    for i in range(100):
        clock.now += 1
        r._store((f"new{i}.test", "A"), "NODATA", clock.now + 1e6)
    assert len(r._cache) <= 100 and ("new99.test", "A") in r._cache
    assert len(walks) <= 100 // 10 + 1


def test_negative_answers_cached_for_negative_ttl():
    clock = Clock()
    stub = StubDns({})

    async def go():
        r = MxResolver(clock=clock, ipv6=False, resolver=stub, negative_ttl=5)
        for _ in range(2):
            with pytest.raises(ResolveError):
                await r.mx_targets("none.test")
        n = len(stub.asked)
        clock.now += 6
        with pytest.raises(ResolveError):
            await r.mx_targets("none.test")
        return n
    assert run(go()) == 2 and len(stub.asked) == 4


def test_answers_cached_against_fake_server(fake_dns):
    fake_dns.zone.update(ZONE)

    async def go():
        r = resolver(fake_dns, ipv6=False)
        try:
            await r.mx_targets("mx.test")
            n = len(fake_dns.queries)
            await r.mx_targets("mx.test")
            return n
        finally:
            await r.close()
    n = run(go())
    assert n == 3 and len(fake_dns.queries) == 3


def test_concurrent_lookups_share_one_query(fake_dns):
    fake_dns.zone.update(ZONE)

    async def go():
        r = resolver(fake_dns, ipv6=False)
        try:
            return await asyncio.gather(*(r.mx_targets("mx.test") for _ in range(20)))
        finally:
            await r.close()
    results = run(go())
    assert all(r == results[0] for r in results)
    assert fake_dns.queries.count(("mx.test", "MX")) == 1


def test_ipme_knows_our_ipv4_address_in_an_aaaa_record_and_the_any_address():
    # An AAAA ::ffff:192.0.2.2 (or ::) connects to this host as 192.0.2.2
    # (or 0.0.0.0) would: delivering there would loop.
    for ours in (parse_ip_literal("::ffff:192.0.2.2"), "::"):
        targets = [MxTarget("192.0.2.1", 10, "a"), MxTarget(ours, 20, "me"),
                   MxTarget("192.0.2.3", 30, "c")]
        assert apply_ipme(targets, {"0.0.0.0", "192.0.2.2"}) == targets[:1]
        with pytest.raises(ResolveError) as info:
            apply_ipme(targets[1:], {"0.0.0.0", "192.0.2.2"})
        assert info.value.text == TEXT_IPME
    assert apply_ipme([MxTarget("::ffff:c000:209", 10, "a")], {"0.0.0.0"}) == [
        MxTarget("::ffff:c000:209", 10, "a")]


def test_ipme_skips_our_address_and_worse():
    targets = [MxTarget("192.0.2.1", 10, "a"), MxTarget("192.0.2.2", 20, "me"),
               MxTarget("192.0.2.3", 30, "c")]
    assert apply_ipme(targets, {"192.0.2.2"}) == targets[:1]
    assert apply_ipme(targets, {"0.0.0.0"}) == targets
    with pytest.raises(ResolveError) as info:
        apply_ipme(targets, {"192.0.2.1"})
    assert info.value.status == "D" and info.value.text == TEXT_IPME
