"""Which domains are ours: `locals`, `virtualdomains`, `percenthack`, `envnoathost`.

Owns the snapshot qmail-send builds from these files and the rewrite it does to
every recipient before choosing local or remote delivery (spec §2):

1. no `@`: append `@` + envnoathost (default: me);
2. percenthack: while the domain is listed and the local part has a `%`, the
   last `%` becomes the `@` (`u%h@d` → `u@h`);
3. domain in locals (exact, ASCII case-insensitive) → local, unchanged;
4. virtualdomains: keys tried in order — whole address, domain, each suffix of
   the domain starting at a `.` (longest first), the empty key; first hit wins;
   an empty value is an exception (→ remote); a value `p` → local `p-<address>`;
5. otherwise remote.

File rules as in qmail: a missing `locals` means `me`; an existing but empty
`locals` means no local domains at all; virtualdomains lines without `:` are
ignored and a later duplicate key wins (constmap). All comparisons lower-case
ASCII letters only — never Unicode case folding, which would map e.g. the
Kelvin sign onto `k` and let a foreign domain pass for one of ours.

This module never reads a file after `load_domain_config` returns.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from engine.config.control import ControlError, read_line, read_list

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def ascii_lower(text: str) -> str:
    """Lower-case A-Z only (qmail's case_lowerb); other characters unchanged."""
    if text.isascii():
        return text.lower()
    return text.translate(_ASCII_LOWER)


class DomainConfigError(Exception):
    """A domain control file is missing where required or unreadable."""


@dataclass(slots=True, frozen=True)
class DomainConfig:
    me: str
    envnoathost: str
    locals: frozenset[str]                 # lower-cased
    virtualdomains: Mapping[str, str]      # lower-cased key → prepend ("" = exception)
    percenthack: frozenset[str]            # lower-cased

    @classmethod
    def build(cls, *, me: str, locals: Iterable[str] | None = None,
              virtualdomains: Iterable[str] = (), percenthack: Iterable[str] = (),
              envnoathost: str | None = None) -> DomainConfig:
        """From file lines; locals None = missing file = `me`."""
        local_set = frozenset(ascii_lower(d) for d in (locals if locals is not None else [me]))
        vdoms: dict[str, str] = {}
        for line in virtualdomains:
            if ":" not in line:
                continue
            key, prepend = line.split(":", 1)
            vdoms[ascii_lower(key)] = prepend
        return cls(
            me=me,
            envnoathost=envnoathost if envnoathost is not None else me,
            locals=local_set,
            virtualdomains=MappingProxyType(vdoms),
            percenthack=frozenset(ascii_lower(d) for d in percenthack),
        )

    def is_local(self, domain: str) -> bool:
        """Domain listed in locals (exact match, no wildcards)."""
        return ascii_lower(domain) in self.locals

    def percent_rewrite(self, address: str) -> str:
        """qmail-send's percent hack for domains listed in control/percenthack."""
        if not self.percenthack:
            return address
        at = address.rfind("@")
        if at < 0:
            return address
        while ascii_lower(address[at + 1:]) in self.percenthack:
            pct = address.rfind("%", 0, at)
            if pct < 0:
                break
            address = address[:pct] + "@" + address[pct + 1:at]
            at = pct
        return address

    def virtual_prepend(self, address: str) -> str | None:
        """The virtualdomains prepend for address, or None (not virtual / exception)."""
        vdoms = self.virtualdomains
        if not vdoms:
            return None
        lowered = ascii_lower(address)
        at = lowered.rfind("@")
        domain = lowered[at + 1:]
        candidates = [lowered, domain]
        candidates += [domain[i:] for i, ch in enumerate(domain) if ch == "."]
        candidates.append("")
        for key in candidates:
            prepend = vdoms.get(key)
            if prepend is not None:
                return prepend or None
        return None

    def resolve(self, recipient: str) -> tuple[str, str]:
        """(channel, address): "local" or "remote" and the rewritten address."""
        address = recipient if "@" in recipient else f"{recipient}@{self.envnoathost}"
        address = self.percent_rewrite(address)
        domain = address[address.rfind("@") + 1:]
        if self.is_local(domain):
            return "local", address
        prepend = self.virtual_prepend(address)
        if prepend is not None:
            return "local", f"{prepend}-{address}"
        return "remote", address


def load_domain_config(root: os.PathLike | str) -> DomainConfig:
    """Read ROOT/control/{me,locals,virtualdomains,percenthack,envnoathost}."""
    control = Path(root) / "control"
    try:
        me = read_line(control / "me")
        if not me:
            raise DomainConfigError("control/me is missing")
        return DomainConfig.build(
            me=me,
            locals=read_list(control / "locals"),
            virtualdomains=read_list(control / "virtualdomains", []) or [],
            percenthack=read_list(control / "percenthack", []) or [],
            envnoathost=read_line(control / "envnoathost"),
        )
    except ControlError as exc:
        raise DomainConfigError(str(exc)) from exc
