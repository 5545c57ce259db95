"""engine.pop3.maildir and engine.pop3.login without a network: the scan, the lock,
the commit at QUIT, the login name."""
from __future__ import annotations

import os
import time
import tracemalloc

import pytest

from engine.accounts.store import split_login
from engine.pop3.maildir import IN_USE, NO_MAILDIR, Mailbox, MailboxBusy, MailboxError

T0 = 1_700_000_000


@pytest.fixture
def maildir(tmp_path):
    md = tmp_path / "Maildir"
    for sub in ("new", "cur", "tmp"):
        (md / sub).mkdir(parents=True)
    for sub, name, mtime, body in (("new", "3.c.host", T0 + 2, b"ccc\n"), ("cur", "1.a.host:2,S", T0, b"a\n"),
                                   ("new", "2.b.host,S=2", T0 + 1, b"bb\n")):
        path = md / sub / name
        path.write_bytes(body)
        os.utime(path, (mtime, mtime))
    return md


def test_scan_order_sizes_uidl(maildir):
    box = Mailbox.open(str(maildir), 100)
    try:
        assert [(m.name, m.size, m.uidl) for m in box.messages] == [
            ("cur/1.a.host:2,S", 2, "1.a.host"), ("new/2.b.host,S=2", 3, "2.b.host,S=2"),
            ("new/3.c.host", 4, "3.c.host")]
        assert box.has_changes()            # two messages still in new/
    finally:
        box.close()


def test_max_messages_keeps_the_oldest(maildir):
    box = Mailbox.open(str(maildir), 2)
    assert [m.uidl for m in box.messages] == ["1.a.host", "2.b.host,S=2"]
    box.close()


def test_the_scan_holds_no_more_than_max_messages(tmp_path):
    # [pop3] max_messages bounds a session's memory: the scan of a catch-all
    # never emptied kept every entry (a few hundred bytes each, 265 MB for a
    # million messages) until it had sorted them all.
    md = tmp_path / "Maildir"
    for sub in ("new", "cur", "tmp"):
        (md / sub).mkdir(parents=True)
    for i in range(20_000):
        path = md / "cur" / f"{T0 - i}.M{i}P12345Q{i}.mail.example.com,S=1234:2,S"
        path.touch()
        os.utime(path, (T0 - i, T0 - i))
    tracemalloc.start()
    try:
        box = Mailbox.open(str(md), 10)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    box.close()
    assert [m.name for m in box.messages][:2] == ["cur/1699980001.M19999P12345Q19999.mail.example.com,S=1234:2,S",
                                                  "cur/1699980002.M19998P12345Q19998.mail.example.com,S=1234:2,S"]
    assert len(box.messages) == 10
    assert peak < 1 << 20, peak


def test_lock_is_exclusive_within_one_process_and_released_by_close(maildir):
    first = Mailbox.open(str(maildir), 100)
    with pytest.raises(MailboxBusy) as err:
        Mailbox.open(str(maildir), 100)
    assert err.value.reply == IN_USE
    first.close()
    first.close()                            # idempotent
    Mailbox.open(str(maildir), 100).close()


def test_missing_maildir(tmp_path):
    with pytest.raises(MailboxError) as err:
        Mailbox.open(str(tmp_path / "nope"), 100)
    assert err.value.reply == NO_MAILDIR and not isinstance(err.value, MailboxBusy)


def test_commit_unlinks_moves_and_counts_failures(maildir):
    box = Mailbox.open(str(maildir), 100)
    box.messages[0].deleted = True           # cur/1.a.host:2,S
    box.messages[1].deleted = True           # new/2.b.host,S=2
    os.unlink(maildir / "new" / "2.b.host,S=2")  # gone meanwhile: qmail's "unable to unlink"
    assert box.commit() == [("new/2.b.host,S=2", "No such file or directory")]   # for the log
    box.close()
    assert sorted(os.listdir(maildir / "cur")) == ["3.c.host:2,"]
    assert os.listdir(maildir / "new") == []


def test_commit_appends_the_unlinked_to_maildirsize(maildir):
    (maildir / "maildirsize").write_text("1000S\n9 3\n")
    box = Mailbox.open(str(maildir), 100)
    box.messages[0].deleted = True           # 2 bytes
    box.messages[2].deleted = True           # 4 bytes
    assert box.commit() == []
    box.close()
    assert (maildir / "maildirsize").read_text() == "1000S\n9 3\n-6 -2\n"
    (maildir / "maildirsize").unlink()       # no maildirsize: none is written
    box = Mailbox.open(str(maildir), 100)
    box.messages[0].deleted = True
    box.commit()
    box.close()
    assert not (maildir / "maildirsize").exists()


def test_commit_takes_off_maildirsize_only_what_the_quota_counts(maildir):
    # An IMAP client flags a message \Deleted (`:2,…T`) without expunging it:
    # Maildir++ no longer counts it (a rebuild skips it), so a POP3 DELE of it
    # frees nothing. Taking it off again leaves maildirsize under the real
    # usage, and the mailbox takes more than its quota until the next rebuild.
    for name, body in (("9.t.host,S=5:2,ST", b"ttttt"), ("8.s.host,S=7:2,S", b"sssssss")):
        path = maildir / "cur" / name
        path.write_bytes(body)
        os.utime(path, (T0 - 10, T0 - 10))
    # as a rebuild counts: 2 + 2 (the name's ,S=) + 4 + 7, the T message not at all
    (maildir / "maildirsize").write_text("1000S\n15 4\n")
    box = Mailbox.open(str(maildir), 100)
    for m in box.messages:
        m.deleted = True
    assert box.commit() == []
    box.close()
    assert (maildir / "maildirsize").read_text() == "1000S\n15 4\n-15 -4\n"


def test_commit_syncs_the_directories_it_changed(maildir, monkeypatch):
    # QUIT's +OK tells the client its deletions are done: a crash right after
    # must not bring the messages back, so the unlinks and renames are synced.
    synced = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    box = Mailbox.open(str(maildir), 100)
    box.messages[0].deleted = True           # cur/1.a.host:2,S; new/ moves to cur/
    box.commit()
    box.close()
    assert sorted(synced) == [str(maildir / "cur"), str(maildir / "new")]


def test_nothing_to_commit(maildir):
    for name in os.listdir(maildir / "new"):
        os.rename(maildir / "new" / name, maildir / "cur" / (name + ":2,"))
    box = Mailbox.open(str(maildir), 100)
    assert not box.has_changes()
    box.messages[0].deleted = True
    assert box.has_changes()
    box.close()


def test_files_of_this_second_wait(maildir):
    now = time.time()
    fresh = maildir / "new" / "4.d.host"
    fresh.write_bytes(b"d\n")
    os.utime(fresh, (now, now))
    box = Mailbox.open(str(maildir), 100, now=now)
    assert "4.d.host" not in [m.uidl for m in box.messages]
    box.close()


@pytest.mark.parametrize("login,parts", [
    ("joe@example.com", ("joe", "example.com")), ("JOE%Example.COM", ("joe", "example.com")),
    ("joe/example.com", ("joe", "example.com")), ("a@b%c", ("a", "b%c")),
    ("joe", None), ("@example.com", None), ("joe@", None)])
def test_split_login(login, parts):
    assert split_login(login) == parts
