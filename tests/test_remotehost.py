"""engine.smtp.remotehost: PTR lookups that never fail a connection."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

from engine.smtp.remotehost import RemoteHostResolver


class Fake:
    def __init__(self, answers: dict, delay: float = 0.0) -> None:
        self.answers, self.delay, self.asked = answers, delay, []

    async def query_dns(self, name: str, qtype: str):
        self.asked.append((name, qtype))
        await asyncio.sleep(self.delay)
        if name not in self.answers:
            raise OSError("NXDOMAIN")
        return SimpleNamespace(answer=[SimpleNamespace(type=t, ttl=5, data=SimpleNamespace(dname=d))
                                       for t, d in self.answers[name]])


def lookup(resolver: RemoteHostResolver, ip: str):
    return asyncio.run(resolver.lookup(ip))


def test_first_ptr_name_without_trailing_dot():
    fake = Fake({"7.2.0.192.in-addr.arpa": [(5, "cname.example."), (12, "Host.Example.NET."), (12, "b.")]})
    assert lookup(RemoteHostResolver(resolver=fake), "192.0.2.7") == "Host.Example.NET"
    assert fake.asked == [("7.2.0.192.in-addr.arpa", "PTR")]


def test_ipv6_reverse_pointer():
    fake = Fake({})
    assert lookup(RemoteHostResolver(resolver=fake), "::1") is None
    assert fake.asked[0][0].endswith(".ip6.arpa") and fake.asked[0][0].startswith("1.0.0.0")


def test_failures_mean_no_name():
    assert lookup(RemoteHostResolver(resolver=Fake({})), "192.0.2.1") is None
    assert lookup(RemoteHostResolver(resolver=Fake({"1.2.0.192.in-addr.arpa": [(12, "")]})), "192.0.2.1") is None
    slow = Fake({"1.2.0.192.in-addr.arpa": [(12, "late.example.")]}, delay=1.0)
    assert lookup(RemoteHostResolver(resolver=slow, timeout=0.1), "192.0.2.1") is None
    assert lookup(RemoteHostResolver(resolver=Fake({})), "not-an-ip") is None
