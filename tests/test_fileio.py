"""engine._fileio: a Maildir delivery's file steps and a directory fsync in C,
their results and what they leave behind on every failure."""
from __future__ import annotations

import errno
import os
import stat
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from engine import _fileio
from engine.delivery.local.maildir import DirSync, MaildirError, MaildirWriter
from tests.test_delivery_e2e import wait_for
from tests.test_local_fixtures import make_maildir

REPO = Path(__file__).resolve().parent.parent


def paths(md, name="m1"):
    return (os.fsencode(md / "tmp" / name), os.fsencode(md / "new" / name))


def test_writes_syncs_and_moves_it_into_new(tmp_path):
    md = make_maildir(tmp_path / "Maildir")
    tmp, new = paths(md)
    assert _fileio.write_linked(tmp, new, [b"Return-Path: <>\n", b"", b"body\n" * 1000]) == (0, 0)
    assert (md / "new" / "m1").read_bytes() == b"Return-Path: <>\n" + b"body\n" * 1000
    assert (md / "new" / "m1").stat().st_mode & 0o777 == 0o600
    assert os.listdir(md / "tmp") == []


def test_no_parts_is_an_empty_file(tmp_path):
    md = make_maildir(tmp_path / "Maildir")
    assert _fileio.write_linked(*paths(md), []) == (0, 0)
    assert (md / "new" / "m1").read_bytes() == b""


def test_an_existing_tmp_file_is_left_alone(tmp_path):
    md = make_maildir(tmp_path / "Maildir")
    (md / "tmp" / "m1").write_bytes(b"someone else's")
    assert _fileio.write_linked(*paths(md), [b"x"]) == (_fileio.OPEN, errno.EEXIST)
    assert (md / "tmp" / "m1").read_bytes() == b"someone else's"
    assert os.listdir(md / "new") == []


def test_a_missing_directory_fails_at_open(tmp_path):
    assert _fileio.write_linked(*paths(tmp_path / "nowhere"), [b"x"]) == (_fileio.OPEN, errno.ENOENT)


def test_an_existing_name_in_new_is_never_replaced(tmp_path):
    md = make_maildir(tmp_path / "Maildir")
    (md / "new" / "m1").write_bytes(b"delivered before")
    assert _fileio.write_linked(*paths(md), [b"x"]) == (_fileio.LINK, errno.EEXIST)
    assert (md / "new" / "m1").read_bytes() == b"delivered before"
    assert os.listdir(md / "tmp") == []


def test_a_failed_write_leaves_nothing(tmp_path):
    """A write refused part way (here: over RLIMIT_FSIZE, EFBIG, in a child
    that ignores SIGXFSZ) unlinks the tmp file and links nothing."""
    md = make_maildir(tmp_path / "Maildir")
    code = (
        "import os, resource, signal, sys\n"
        "from engine import _fileio\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        "print(*_fileio.write_linked(os.fsencode(sys.argv[1]), os.fsencode(sys.argv[2]),"
        " [b'x' * 3000, b'y' * 3000]))\n")
    tmp, new = paths(md)
    got = subprocess.run([sys.executable, "-c", code, tmp, new], capture_output=True,
                         text=True, cwd=REPO, check=True).stdout.split()
    assert [int(v) for v in got] == [_fileio.WRITE, errno.EFBIG]
    assert os.listdir(md / "tmp") == [] and os.listdir(md / "new") == []


def test_fsync_dir(tmp_path):
    assert _fileio.fsync_dir(os.fsencode(tmp_path)) == 0
    assert _fileio.fsync_dir(os.fsencode(tmp_path / "gone")) == errno.ENOENT
    (tmp_path / "f").write_bytes(b"")
    assert _fileio.fsync_dir(os.fsencode(tmp_path / "f")) == errno.ENOTDIR


def test_write_linked_syncs_the_directory_given(tmp_path):
    md = make_maildir(tmp_path / "Maildir")
    assert _fileio.write_linked(*paths(md), [b"x"], os.fsencode(md / "new")) == (0, 0)
    assert (md / "new" / "m1").read_bytes() == b"x"


def test_a_failed_directory_sync_takes_the_message_back(tmp_path):
    """Linked but not known to be durable: nothing is left in new/ or tmp/."""
    md = make_maildir(tmp_path / "Maildir")
    assert _fileio.write_linked(*paths(md), [b"x"], os.fsencode(tmp_path / "gone")) == \
        (_fileio.SYNCDIR, errno.ENOENT)
    assert os.listdir(md / "new") == [] and os.listdir(md / "tmp") == []


def test_the_writer_uses_it_by_default(tmp_path):
    md = make_maildir(tmp_path / "Maildir")
    w = MaildirWriter("h")
    name = w.deliver(str(md), [b"a\n", b"b\n"], size_suffix=True)
    assert name.endswith(",S=4")
    assert (md / "new" / name).read_bytes() == b"a\nb\n"
    assert os.listdir(md / "tmp") == []
    assert w.dirsync.fsyncs == 1 and w.dirsync._dirs == {}


def test_the_writer_syncs_in_its_own_call_only_when_alone(tmp_path, monkeypatch):
    """A delivery that finds another linking into the same new/ leaves the
    fsync to DirSync (shared with the other's); one alone makes it in
    write_linked, and a delivery arriving meanwhile waits for that fsync and
    then makes its own."""
    md = make_maildir(tmp_path / "Maildir")
    w = MaildirWriter("h")
    newdir = str(md / "new")
    calls = []
    real = _fileio.write_linked
    monkeypatch.setattr(_fileio, "write_linked",
                        lambda *a: calls.append(a[3]) or real(*a))
    other = w.dirsync.claim(newdir)                 # another delivery, linking
    assert w.dirsync.claim(newdir) is None
    done = threading.Event()
    t = threading.Thread(target=lambda: (w.deliver(str(md), [b"a\n"]), done.set()))
    t.start()
    wait_for(lambda: w.dirsync._dirs[newdir].linked == 2, what="the second delivery waiting")
    assert not done.is_set() and calls == [None]    # linked, waiting for the fsync in flight
    w.dirsync.done(newdir, other, True, True)
    t.join(10)
    assert done.is_set() and w.dirsync.fsyncs == 2  # the other's, then its own
    w.deliver(str(md), [b"b\n"])
    assert calls == [None, os.fsencode(newdir)] and w.dirsync.fsyncs == 3
    assert len(os.listdir(md / "new")) == 2 and w.dirsync._dirs == {}


def test_the_writer_reports_its_failures(tmp_path):
    md = make_maildir(tmp_path / "Maildir")
    os.chmod(md / "tmp", 0o500)
    try:
        if os.access(md / "tmp", os.W_OK):   # root ignores the mode
            os.rmdir(md / "tmp")
        try:
            MaildirWriter("h").deliver(str(md), [b"x\n"])
            raise AssertionError("delivered without a tmp/")
        except MaildirError as exc:
            assert exc.kind == "write" and exc.errno in (errno.EACCES, errno.ENOENT)
    finally:
        if (md / "tmp").exists():
            os.chmod(md / "tmp", 0o700)
    assert os.listdir(md / "new") == []


def test_a_directory_sync_failure_raises_oserror(tmp_path):
    try:
        DirSync().sync(str(tmp_path / "gone"))
        raise AssertionError("synced a missing directory")
    except OSError as exc:
        assert exc.errno == errno.ENOENT


def test_a_missing_maildir_is_chdir_a_missing_tmp_is_write(tmp_path):
    """qmail-local's two maildir failures, told apart only once the open failed."""
    try:
        MaildirWriter("h").deliver(str(tmp_path / "nowhere"), [b"x\n"])
        raise AssertionError("delivered into nothing")
    except MaildirError as exc:
        assert exc.kind == "chdir" and exc.errno == errno.ENOENT
    md = make_maildir(tmp_path / "Maildir")
    os.rmdir(md / "tmp")
    try:
        MaildirWriter("h").deliver(str(md), [b"x\n"])
        raise AssertionError("delivered without tmp/")
    except MaildirError as exc:
        assert exc.kind == "write" and exc.errno == errno.ENOENT


def test_names_carry_the_pid_of_the_process_after_a_fork(tmp_path):
    md = make_maildir(tmp_path / "Maildir")
    w = MaildirWriter("h")
    assert f"P{os.getpid()}Q" in w.deliver(str(md), [b"x\n"])
    r, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(wfd, w.deliver(str(md), [b"y\n"]).encode())
        finally:
            os._exit(0)
    os.close(wfd)
    name = os.read(r, 4096).decode()
    os.close(r)
    os.waitpid(pid, 0)
    assert f"P{pid}Q" in name


def test_a_nul_in_a_path_is_refused_not_cut(tmp_path):
    """C would stop at the NUL and write elsewhere ("Mail" in the home)."""
    md = make_maildir(tmp_path / "Mail")
    for call in (lambda: _fileio.write_linked(os.fsencode(md / "tmp" / "x\0y"),
                                              os.fsencode(md / "new" / "x"), [b"x"]),
                 lambda: _fileio.fsync_dir(os.fsencode(tmp_path) + b"/Mail\0dir")):
        try:
            call()
            raise AssertionError("a NUL path was used")
        except ValueError:
            pass
    assert os.listdir(md / "tmp") == [] and sorted(os.listdir(tmp_path)) == ["Mail"]


def test_the_writer_takes_any_bytes_like_part(tmp_path):
    md = make_maildir(tmp_path / "Maildir")
    name = MaildirWriter("h").deliver(str(md), [bytearray(b"a\n"), memoryview(b"b\n")])
    assert (md / "new" / name).read_bytes() == b"a\nb\n"


# --- mode_uid, stat_keys and read_file: the same answers from the caches and without them ------

@pytest.fixture(params=[True, False], ids=["cached", "uncached"])
def cached(request):
    was = _fileio.use_cached(request.param)
    yield request.param
    _fileio.use_cached(was)


def test_mode_uid_is_os_stat(tmp_path, cached):
    f = tmp_path / "f"
    f.write_bytes(b"x")
    f.chmod(0o640)
    for p in (f, tmp_path):
        st = os.stat(p)
        assert _fileio.mode_uid(os.fsencode(p)) == (st.st_mode, st.st_uid)


@pytest.mark.parametrize("missing", ["nothing", "file/under"])
def test_mode_uid_raises_as_os_stat(tmp_path, cached, missing):
    (tmp_path / "file").write_bytes(b"")
    path = tmp_path / missing
    with pytest.raises(OSError) as want:
        os.stat(path)
    with pytest.raises(OSError) as got:
        _fileio.mode_uid(os.fsencode(path))
    assert (type(got.value), got.value.errno, got.value.filename) == \
        (type(want.value), want.value.errno, str(path))


def test_stat_keys_are_os_stat(tmp_path, cached):
    f = tmp_path / "f"
    f.write_bytes(b"xyz")
    f.chmod(0o640)
    paths = (os.fsencode(f), os.fsencode(tmp_path), os.fsencode(tmp_path / "nothing"),
             os.fsencode(f) + b"/under")
    keys = []
    for p in paths[:2]:
        st = os.stat(p)
        keys.append((st.st_dev, st.st_ino, st.st_mode, st.st_uid, st.st_size,
                     st.st_mtime_ns, st.st_ctime_ns))
    got = _fileio.stat_keys(paths)
    assert list(struct.iter_unpack("7q", got)) == [*keys, (0,) * 7, (0,) * 7]
    assert _fileio.stat_keys(()) == b""
    with pytest.raises(ValueError):
        _fileio.stat_keys((os.fsencode(tmp_path) + b"/a\0b",))
    with pytest.raises(TypeError):
        _fileio.stat_keys((str(tmp_path),))


@pytest.mark.parametrize("size", [0, 55, 4096, (1 << 20) + 3, 3 << 20])
def test_read_file_reads_all_of_a_regular_file(tmp_path, cached, size):
    """Small files in one read; past 1 MB the buffer grows."""
    f = tmp_path / ".qmail-default"
    data = os.urandom(size)
    f.write_bytes(data)
    f.chmod(0o700)
    assert _fileio.read_file(os.fsencode(f)) == (0, 0, os.stat(f).st_mode, data)


def test_read_file_of_anything_else_reads_nothing(tmp_path, cached):
    """A directory or a FIFO: its mode and no content (O_NONBLOCK: no wait
    for a writer)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for p in (tmp_path, fifo):
        assert _fileio.read_file(os.fsencode(p), os.O_NONBLOCK) == (0, 0, os.stat(p).st_mode, None)


def test_read_file_says_when_the_open_failed(tmp_path, cached):
    (tmp_path / "file").write_bytes(b"")
    assert _fileio.read_file(os.fsencode(tmp_path / "none")) == (_fileio.OPEN, errno.ENOENT, 0, None)
    assert _fileio.read_file(os.fsencode(tmp_path / "file" / "x")) == \
        (_fileio.OPEN, errno.ENOTDIR, 0, None)


def test_read_file_says_when_a_read_failed(tmp_path, cached):
    """/proc/self/mem is a regular file whose read at offset 0 fails (EIO):
    the read's errno and the file's mode come back."""
    mem = Path("/proc/self/mem")
    mode = os.stat(mem).st_mode
    assert stat.S_ISREG(mode)
    assert _fileio.read_file(os.fsencode(mem)) == (_fileio.READ, errno.EIO, mode, None)


def test_mode_uid_and_read_file_refuse_a_nul(tmp_path):
    for call in (_fileio.mode_uid, _fileio.read_file):
        with pytest.raises(ValueError):
            call(os.fsencode(tmp_path) + b"/a\0b")
