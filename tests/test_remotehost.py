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
        return SimpleNamespace(answer=[SimpleNamespace(type=t, ttl=5, data=SimpleNamespace(
            dname=d, addr=d)) for t, d in self.answers[name]])


def lookup(resolver: RemoteHostResolver, ip: str):
    return asyncio.run(resolver.lookup(ip))


def test_first_ptr_name_without_trailing_dot():
    fake = Fake({"7.2.0.192.in-addr.arpa": [(5, "cname.example."), (12, "Host.Example.NET."), (12, "b.")]})
    assert lookup(RemoteHostResolver(resolver=fake, paranoid=False), "192.0.2.7") == "Host.Example.NET"
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


def test_paranoid_keeps_a_name_only_when_its_addresses_hold_the_client():
    """tcpserver -p: a PTR anyone may write for their own address is believed
    only when the name's A (IPv4) or AAAA (IPv6) records point back."""
    ptr = {"7.2.0.192.in-addr.arpa": [(12, "mail.customer.example.")],
           "9.2.0.192.in-addr.arpa": [(12, "mail.customer.example.")]}
    fake = Fake({**ptr, "mail.customer.example": [(1, "192.0.2.8"), (1, "192.0.2.7")]})
    resolver = RemoteHostResolver(resolver=fake)
    assert lookup(resolver, "192.0.2.7") == "mail.customer.example"
    assert fake.asked == [("7.2.0.192.in-addr.arpa", "PTR"), ("mail.customer.example", "A")]
    assert lookup(resolver, "192.0.2.9") is None                 # the name is not its
    assert lookup(RemoteHostResolver(resolver=Fake(ptr)), "192.0.2.7") is None   # no A at all
    v6 = Fake({"1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa":
               [(12, "six.example.")], "six.example": [(28, "2001:db8:0:0::1")]})
    assert lookup(RemoteHostResolver(resolver=v6), "2001:db8::1") == "six.example"
    assert v6.asked[-1] == ("six.example", "AAAA")
    slow = Fake({**ptr, "mail.customer.example": [(1, "192.0.2.7")]}, delay=0.3)
    assert lookup(RemoteHostResolver(resolver=slow, timeout=0.5), "192.0.2.7") is None  # both count
