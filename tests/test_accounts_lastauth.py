"""engine/accounts/lastauth.py: vchkpw's USERDIR/lastauth, written after a login."""
from __future__ import annotations

import os
import time

from engine.accounts import lastauth


def test_record_and_read(tmp_path):
    assert lastauth.read(str(tmp_path)) is None
    before = time.time() - 1
    assert lastauth.record(str(tmp_path), "192.0.2.7")
    ip, when = lastauth.read(str(tmp_path))
    assert ip == "192.0.2.7" and when >= before
    assert lastauth.record(str(tmp_path), "::1")                 # replaced, not appended
    assert (tmp_path / "lastauth").read_text() == "::1"
    assert os.stat(tmp_path / "lastauth").st_mode & 0o777 == 0o600


def test_best_effort(tmp_path, monkeypatch):
    assert not lastauth.record("", "192.0.2.7")
    # A relative vpasswd directory is not resolved against the working directory.
    (tmp_path / "joe").mkdir()
    monkeypatch.chdir(tmp_path)
    assert not lastauth.record("joe", "192.0.2.7")
    assert not (tmp_path / "joe" / "lastauth").exists()
    assert not lastauth.record(str(tmp_path / "missing"), "192.0.2.7")
    (tmp_path / "elsewhere").write_text("x")
    (tmp_path / "lastauth").symlink_to(tmp_path / "elsewhere")   # never followed
    assert not lastauth.record(str(tmp_path), "192.0.2.7")
    assert (tmp_path / "elsewhere").read_text() == "x"


def test_read_follows_no_link_and_waits_on_no_fifo(tmp_path):
    """`qrelay user show` reads it as root in a directory the domain's owner
    writes: a link to a file only root may read was shown as the address."""
    secret = tmp_path / "secret"
    secret.write_text("root:$6$only-root-may-read-this")
    user = tmp_path / "user"
    user.mkdir()
    (user / "lastauth").symlink_to(secret)
    assert lastauth.read(str(user)) is None
    (user / "lastauth").unlink()
    os.mkfifo(user / "lastauth")              # no writer: an open without O_NONBLOCK hangs
    assert lastauth.read(str(user)) is None
    (user / "lastauth").unlink()
    (user / "lastauth").write_bytes(b"192.0.2.7" + b"x" * 1_000_000)
    assert lastauth.read(str(user))[0] == "192.0.2.7" + "x" * (lastauth.MAX_READ - 9)


def test_record_never_waits_on_a_fifo_the_owner_put_there(tmp_path):
    # The receivers record logins in a thread of their AUTH/POP3 pool: a FIFO
    # as lastauth (the domain's owner writes the directory) held that thread
    # in open() for ever, and with it the logins queued behind it.
    import threading
    os.mkfifo(tmp_path / "lastauth")
    got = []
    t = threading.Thread(target=lambda: got.append(lastauth.record(str(tmp_path), "192.0.2.7")),
                         daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():                          # let it go before failing
        os.close(os.open(tmp_path / "lastauth", os.O_RDONLY | os.O_NONBLOCK))
    assert got == [False]
