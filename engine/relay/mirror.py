"""A process's own copy of the embedded table's grants, so that a relay check
costs the same with 100,000 entries as with 10.

Why: a lookup in LMDB walks a B+tree, and with 100,000 grants that is three
pages and a binary search in each, a dozen cache lines far from the CPU: on
the 2-core VM it cost 0.3-0.6 us more per check than with 10 grants (the whole
check being ~2 us), and a Python dict is no better (its index, entry and key
object are three misses). Here the IPv4 grants are one flat array of 64-bit
slots, open addressing with linear probing, at most half full: a check reads
one slot, one cache line, and 100,000 grants take 2 MB. A slot is

    address << 32 | min(floor(expiry) + 1, 2**32 - 1)      (0 = empty)

so `lower_bound` gives floor(expiry) <= expiry < floor(expiry) + 1: the caller
answers from it except within the last second of a grant, where it reads the
exact expiry from LMDB. IPv6 grants (few) sit in a dict with their expiry.

The copy is exact as of one LMDB transaction id (`txnid`): embedded.py logs
the keys each write transaction changed, and a check whose read transaction
has a newer id replays them (or rebuilds the copy when the log no longer
reaches back that far), so a grant or revoke committed by any process is
honoured by the next check of every other one. Only the thread that checks
touches this object.
"""
from __future__ import annotations

from array import array
from collections.abc import Iterable

_LOW = 0xFFFFFFFF
_HASH = 2654435761          # Knuth's multiplicative hash (addresses cluster by network)
_MIN_BITS = 4


def _stamp(expiry: float) -> int:
    return min(max(int(expiry), 0) + 1, _LOW)


class GrantMirror:
    """IPv4 slots + IPv6 dict, and the transaction id they reflect (-1: none)."""

    def __init__(self) -> None:
        self.txnid = -1
        self.v6: dict[bytes, float] = {}
        self._resize(_MIN_BITS)
        self.count = 0

    def _resize(self, bits: int) -> None:
        old = getattr(self, "slots", None)
        self.bits, self.shift, self.mask = bits, 32 - bits, (1 << bits) - 1
        self.slots = array("Q", bytes(8 << bits))
        if old is not None:
            for slot in old:
                if slot:
                    self._place(slot)

    def _place(self, slot: int) -> None:
        slots, mask = self.slots, self.mask
        i = (((slot >> 32) * _HASH) & _LOW) >> self.shift
        while slots[i]:
            i = (i + 1) & mask
        slots[i] = slot

    def load(self, v4: Iterable[tuple[int, float]], v6: Iterable[tuple[bytes, float]],
             count4: int, txnid: int) -> None:
        """Replace the whole copy: `v4` (address as an int, expiry), about
        `count4` of them, and `v6` (16 bytes, expiry), as of `txnid`."""
        self.v6 = dict(v6)
        self._resize(max(_MIN_BITS, (2 * count4).bit_length()))
        slots, mask, shift = self.slots, self.mask, self.shift
        count = 0
        for addr, expiry in v4:        # distinct addresses (a table's keys): no update case
            i = ((addr * _HASH) & _LOW) >> shift
            while slots[i]:
                i = (i + 1) & mask
            slots[i] = addr << 32 | _stamp(expiry)
            count += 1
        self.count = count
        if count * 2 > len(slots):
            self._resize((2 * count).bit_length())
        self.txnid = txnid

    def lower_bound(self, packed: bytes) -> float | None:
        """floor(expiry) of the address's grant (within 1 s below it), or
        None if it has none. `packed`: 4 or 16 bytes (engine.relay.packed_ip)."""
        if len(packed) != 4:
            return self.v6.get(packed)
        addr = int.from_bytes(packed, "big")
        slots = self.slots
        i = ((addr * _HASH) & _LOW) >> self.shift
        while True:
            slot = slots[i]
            if slot >> 32 == addr:
                return (slot & _LOW) - 1 if slot else None    # 0.0.0.0 vs an empty slot
            if not slot:
                return None
            i = (i + 1) & self.mask

    def put(self, packed: bytes, expiry: float) -> None:
        if len(packed) != 4:
            self.v6[packed] = expiry
            return
        addr = int.from_bytes(packed, "big")
        slots, mask = self.slots, self.mask
        i = ((addr * _HASH) & _LOW) >> self.shift
        while slots[i]:
            if slots[i] >> 32 == addr:
                slots[i] = addr << 32 | _stamp(expiry)
                return
            i = (i + 1) & mask
        slots[i] = addr << 32 | _stamp(expiry)
        self.count += 1
        if self.count * 2 > len(slots):
            self._resize(self.bits + 1)

    def delete(self, packed: bytes) -> None:
        if len(packed) != 4:
            self.v6.pop(packed, None)
            return
        addr = int.from_bytes(packed, "big")
        slots, mask, shift = self.slots, self.mask, self.shift
        i = ((addr * _HASH) & _LOW) >> shift
        while True:
            slot = slots[i]
            if not slot:
                return
            if slot >> 32 == addr:
                break
            i = (i + 1) & mask
        # Backward-shift deletion: no tombstones, so probe chains stay short.
        j = i
        while True:
            j = (j + 1) & mask
            slot = slots[j]
            if not slot:
                break
            home = (((slot >> 32) * _HASH) & _LOW) >> shift
            # Move slot j into the hole at i unless its home lies cyclically in (i, j].
            if (i <= j and not i < home <= j) or (i > j and not (home > i or home <= j)):
                slots[i] = slot
                i = j
        slots[i] = 0
        self.count -= 1
        if self.bits > _MIN_BITS and self.count * 8 < len(slots):
            self._resize(self.bits - 1)
