"""bench/bench_auth.py's handshake floor: OpenSSL alone, qrelay's server context
and a flood-like client through memory BIOs."""
from __future__ import annotations

import sys
from pathlib import Path

import trustme

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from bench_auth import handshake_floor  # noqa: E402


def test_the_floor_times_full_and_resumed_handshakes(tmp_path):
    ca = trustme.CA(key_type=trustme.KeyType.RSA)
    (tmp_path / "control").mkdir()
    ca.issue_cert("bench.local", key_type=trustme.KeyType.RSA) \
        .private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "control" / "servercert.pem"))
    floor = handshake_floor(tmp_path, n=20)
    # CPU time, not wall time: a full handshake signs with the RSA key, which a
    # resumed one (it raises unless the client's session was resumed) never does.
    assert floor["full"] > floor["resumed"] > 0
