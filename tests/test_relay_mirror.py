"""The process's copy of the grants (engine/relay/mirror.py): the flat IPv4
table and the IPv6 dict against a plain dict, through growth, shrinking and
deletions in crowded probe chains."""
from __future__ import annotations

import random
from socket import AF_INET, AF_INET6, inet_pton

from engine.relay.mirror import GrantMirror


def test_against_a_dict() -> None:
    rng = random.Random(13)
    # A small pool, so addresses come back, collide and are deleted often.
    pool = [inet_pton(AF_INET, f"10.{rng.randrange(4)}.{rng.randrange(256)}.{rng.randrange(256)}")
            for _ in range(3000)]
    pool += [bytes(4), b"\xff" * 4, inet_pton(AF_INET6, "2001:db8::1"), inet_pton(AF_INET6, "::1")]
    mirror, truth = GrantMirror(), {}
    sizes = set()
    for step in range(40_000):
        packed = rng.choice(pool)
        # Grow to ~3000 entries, then delete most of them (the table shrinks).
        if rng.random() < (0.7 if step < 20_000 else 0.2):
            expiry = rng.choice([0.0, 0.5, 1.0, 1_800_000_000.25, 1_800_000_007.0, 5e9])
            mirror.put(packed, expiry)
            truth[packed] = expiry
        else:
            mirror.delete(packed)
            truth.pop(packed, None)
        sizes.add(len(mirror.slots))
        if step % 997 == 0:
            for p in pool:
                want = truth.get(p)
                got = mirror.lower_bound(p)
                if want is None:
                    assert got is None, p
                else:   # never above the expiry, and within the second below it
                    assert got <= want and (want < got + 1 or got == 2**32 - 2), (p, want, got)
    assert mirror.count == sum(len(p) == 4 for p in truth)
    assert max(sizes) >= 8192 and len(mirror.slots) < max(sizes)     # grew and shrank
    assert mirror.count * 2 <= len(mirror.slots)


def test_zero_address_is_not_an_empty_slot() -> None:
    mirror = GrantMirror()
    zero = bytes(4)
    assert mirror.lower_bound(zero) is None
    mirror.put(zero, 0.25)
    assert mirror.lower_bound(zero) == 0
    mirror.put(zero, 100.0)
    assert mirror.lower_bound(zero) == 100
    mirror.delete(zero)
    assert mirror.lower_bound(zero) is None and mirror.count == 0
