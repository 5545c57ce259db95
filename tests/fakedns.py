"""A fake authoritative DNS server for tests (dnslib), on 127.0.0.1, UDP and TCP.

Tests never ask the machine's resolver: they start a FakeDns with a zone given
as a dict and point qrelay's `dns_servers` at `server.address` ("127.0.0.1:PORT").

    zone = {
        "example.test": {"MX": [(10, "mx1.example.test"), (20, "mx2.example.test")]},
        "mx1.example.test": {"A": ["127.0.0.2"], "AAAA": ["::1"], "ttl": 60},
        "alias.test": {"CNAME": "example.test"},
        "nullmx.test": {"MX": [(0, ".")]},            # RFC 7505 null MX
        "broken.test": "SERVFAIL",                     # every query answers SERVFAIL
        "slow.test": "TIMEOUT",                        # every query is ignored
    }

A name not in the zone answers NXDOMAIN; a name present without records of
the asked type answers NOERROR with an empty answer (NODATA). A CNAME is
followed inside the zone, as a recursive resolver would. Names are matched
case-insensitively, with or without the trailing dot. `ttl` (per name) sets
the TTL of that name's records (default `FakeDns.default_ttl`).

The zone may be changed while the server runs (`server.zone[...] = ...`);
`server.queries` records every (name, type) asked, for cache tests.

Use it as a context manager, or through the `fake_dns` fixture (import it
into a test module: `from tests.fakedns import fake_dns`), whose value is a
started server with an empty zone; the fixture stops it afterwards.
"""
from __future__ import annotations

import selectors
import socket
import struct
import threading
from typing import Any

import pytest
from dnslib import AAAA, CNAME, MX, QTYPE, RCODE, RR, A, DNSLabel, DNSRecord

Zone = dict[str, Any]


def _key(name: str | DNSLabel) -> str:
    return str(name).rstrip(".").lower()


class FakeDns:
    """A small threaded DNS server answering from a dict zone."""

    default_ttl = 300

    def __init__(self, zone: Zone | None = None, host: str = "127.0.0.1") -> None:
        self.zone: Zone = {_key(k): v for k, v in (zone or {}).items()}
        self.host = host
        self.port = 0
        self.queries: list[tuple[str, str]] = []
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    # --- lifecycle -------------------------------------------------------

    @property
    def address(self) -> str:
        """"host:port" for qrelay's dns_servers setting."""
        return f"{self.host}:{self.port}"

    def start(self) -> "FakeDns":
        # c-ares uses one port for UDP and TCP: find a port free for both.
        for _ in range(50):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind((self.host, 0))
            port = udp.getsockname()[1]
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind((self.host, port))
            except OSError:
                udp.close()
                tcp.close()
                continue
            tcp.listen(16)
            break
        else:  # pragma: no cover - a machine with no free port pair
            raise RuntimeError("fakedns: no port free for both UDP and TCP")
        self._udp, self._tcp, self.port = udp, tcp, port
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, name="fakedns", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stopping = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        self._thread.join(5)
        self._thread = None
        for s in (self._udp, self._tcp, self._wake_r, self._wake_w):
            if s is not None:
                s.close()

    def __enter__(self) -> "FakeDns":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- serving ---------------------------------------------------------

    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._udp, selectors.EVENT_READ, "udp")
        sel.register(self._tcp, selectors.EVENT_READ, "tcp")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._stopping:
                for key, _ in sel.select(1.0):
                    if key.data == "udp":
                        try:
                            data, peer = self._udp.recvfrom(65535)
                        except OSError:
                            continue
                        reply = self.answer(data)
                        if reply is not None:
                            self._udp.sendto(reply, peer)
                    elif key.data == "tcp":
                        try:
                            conn, _ = self._tcp.accept()
                        except OSError:
                            continue
                        threading.Thread(target=self._serve_tcp, args=(conn,), daemon=True).start()
        finally:
            sel.close()

    def _serve_tcp(self, conn: socket.socket) -> None:
        conn.settimeout(2.0)
        try:
            while not self._stopping:
                head = self._recv_exact(conn, 2)
                if head is None:
                    return
                data = self._recv_exact(conn, struct.unpack("!H", head)[0])
                if data is None:
                    return
                reply = self.answer(data)
                if reply is not None:
                    conn.sendall(struct.pack("!H", len(reply)) + reply)
        except OSError:
            pass
        finally:
            conn.close()

    @staticmethod
    def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
        buf = b""
        while len(buf) < n:
            chunk = conn.recv(n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return buf

    # --- answering -------------------------------------------------------

    def answer(self, data: bytes) -> bytes | None:
        """The wire reply to one query (None = stay silent)."""
        try:
            request = DNSRecord.parse(data)
        except Exception:
            return None
        reply = request.reply()
        qname = request.q.qname
        qtype = QTYPE[request.q.qtype]
        self.queries.append((_key(qname), qtype))
        name = _key(qname)
        for _ in range(10):  # CNAME chain bound, as qmail's dns.c
            entry = self.zone.get(name)
            if entry is None:
                if not reply.rr:
                    reply.header.rcode = RCODE.NXDOMAIN
                return reply.pack()
            if entry == "TIMEOUT":
                return None
            if entry == "SERVFAIL":
                reply.header.rcode = RCODE.SERVFAIL
                return reply.pack()
            ttl = int(entry.get("ttl", self.default_ttl))
            if "CNAME" in entry and qtype != "CNAME":
                target = _key(entry["CNAME"])
                reply.add_answer(RR(name, QTYPE.CNAME, ttl=ttl, rdata=CNAME(target + ".")))
                name = target
                continue
            for rr in self._records(name, entry, qtype, ttl):
                reply.add_answer(rr)
            return reply.pack()
        return reply.pack()

    @staticmethod
    def _records(name: str, entry: dict, qtype: str, ttl: int) -> list[RR]:
        out: list[RR] = []
        values = entry.get(qtype)
        if values is None:
            return out
        if qtype == "A":
            out = [RR(name, QTYPE.A, ttl=ttl, rdata=A(v)) for v in values]
        elif qtype == "AAAA":
            out = [RR(name, QTYPE.AAAA, ttl=ttl, rdata=AAAA(v)) for v in values]
        elif qtype == "MX":
            out = [RR(name, QTYPE.MX, ttl=ttl,
                      rdata=MX("." if host in (".", "") else host.rstrip(".") + ".", pref))
                   for pref, host in values]
        elif qtype == "CNAME":
            out = [RR(name, QTYPE.CNAME, ttl=ttl, rdata=CNAME(_key(values) + "."))]
        return out


@pytest.fixture
def fake_dns():
    """A started FakeDns with an empty zone (fill `fake_dns.zone`); stopped afterwards."""
    server = FakeDns().start()
    try:
        yield server
    finally:
        server.stop()
