"""engine/inject.py: `qrelay inject` (qmail-inject) and the sendmail program,
run as real subprocesses on fresh roots made by `init`; what they queued is
read back with engine.queue's Spool."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

from engine.inject import (Identity, InjectError, InjectNames, parse_sendmail_args, prepare,
                           UsageError)
from engine.queue import Spool
from tests.conftest import REPO

NAMES = InjectNames(defaulthost="mx.example.com", defaultdomain="example.com",
                    plusdomain="plus.example.com", idhost="mx.example.com")
ALICE = Identity(user="alice", host=None, full_name=None, return_user="alice", return_host=None)
BASE_ENV = {k: v for k, v in os.environ.items()
            if not k.startswith(("QMAIL", "MAIL")) and k not in ("USER", "LOGNAME", "NAME")}


def run(args: list[str], data: bytes = b"", env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], input=data, cwd=REPO, capture_output=True,
                          timeout=timeout,
                          env={**BASE_ENV, "PYTHONPATH": str(REPO), **(env or {})})


def inject(root: Path, *args: str, data: bytes, env: dict[str, str] | None = None):
    return run(["-m", "engine.cli", "inject", str(root), *args], data, {"USER": "alice", **(env or {})})


def sendmail(root: Path, *args: str, data: bytes = b"", env: dict[str, str] | None = None):
    return run(["-m", "engine.inject", *args], data,
               {"USER": "alice", "QRELAY_ROOT": str(root), **(env or {})})


def queued(root: Path) -> list[tuple[object, object, bytes]]:
    """(QueuedMessage, Envelope, bytes) of every message in the spool."""
    if not (root / "queue" / "index" / "data.mdb").exists():
        return []           # nothing was ever queued here
    with Spool(root / "queue", readonly=True) as spool:
        return [(m, spool.envelope(m.msgid), spool.read_message(m.msgid))
                for m in spool.iter_messages()]


def header_of(message: bytes) -> list[bytes]:
    return message.split(b"\r\n\r\n", 1)[0].split(b"\r\n")


# --------------------------------------------------------------------------- qrelay inject

def test_inject_queues_a_durable_local_message_with_qmail_injects_fields(root):
    done = inject(root, "bob@example.net", data=b"Subject: hello\n\nline one\nline two\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"" and done.stderr == b""
    [(info, envelope, message)] = queued(root)
    assert envelope.sender == "alice@mx.example.com"
    assert envelope.recipients == ("bob@example.net",)
    assert (info.origin, info.uid) == ("local", os.getuid())
    lines = header_of(message)
    assert re.fullmatch(rb"Received: \(qmail %d invoked by uid %d\); \d+ \w{3} \d{4} \d\d:\d\d:\d\d -0000"
                        % (info.pid, os.getuid()), lines[0])
    assert re.fullmatch(rb"Date: \d+ \w{3} \d{4} \d\d:\d\d:\d\d -0000", lines[1])
    assert re.fullmatch(rb"Message-ID: <\d{14}\.%d\.qmail@mx\.example\.com>" % info.pid, lines[2])
    assert lines[3:] == [b"From: alice@mx.example.com", b"Cc: recipient list not shown: ;",
                         b"Subject: hello"]
    assert message.endswith(b"\r\n\r\nline one\r\nline two\r\n")


def test_line_ends_become_crlf_and_a_bare_cr_ends_a_line(root):
    data = b"Subject: ends\r\nX-Mixed: yes\n\r\nunix\ndos\r\nold mac\rlast without end"
    assert inject(root, "bob@example.net", data=data).returncode == 0
    [(_, _, message)] = queued(root)
    body = message.split(b"\r\n\r\n", 1)[1]
    assert body == b"unix\r\ndos\r\nold mac\r\nlast without end\r\n"
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", message) is None


def test_t_takes_to_cc_and_bcc_and_removes_bcc(root):
    data = (b"From: Web <www@shop.example.com>\nTo: Bob <bob@example.net>, carol\n"
            b"Cc: dave@example.org\nBcc: eve@example.org, frank@example.org\n"
            b"Subject: order\n\nthanks\n")
    done = inject(root, "-t", data=data)
    assert done.returncode == 0, done.stderr
    [(_, envelope, message)] = queued(root)
    assert envelope.recipients == ("bob@example.net", "carol@mx.example.com", "dave@example.org",
                                   "eve@example.org", "frank@example.org")
    assert b"eve@" not in message and b"Bcc" not in message
    assert b"To: Bob <bob@example.net>, carol@mx.example.com\r\n" in message
    assert b"From: Web <www@shop.example.com>\r\n" in message
    assert b"Cc: recipient list not shown" not in message


def test_without_arguments_the_header_gives_the_recipients(root):
    assert inject(root, data=b"To: bob@example.net\n\nhi\n").returncode == 0
    [(_, envelope, _)] = queued(root)
    assert envelope.recipients == ("bob@example.net",)


def test_f_sets_the_envelope_sender_and_qualifies_it(root):
    assert inject(root, "-f", "bounces", "bob@example.net", data=b"\nhi\n").returncode == 0
    assert inject(root, "-f", "", "bob@example.net", data=b"\nhi\n").returncode == 0
    senders = [e.sender for _, e, _ in queued(root)]
    assert senders == ["bounces@mx.example.com", ""]


def test_controls_and_environment_decide_the_names(root):
    (root / "control" / "defaulthost").write_text("example.com\n")
    (root / "control" / "idhost").write_text("id.example.com\n")
    env = {"QMAILUSER": "web", "QMAILNAME": "Web Shop", "QMAILSUSER": "bounce",
           "QMAILDEFAULTDOMAIN": "example.org"}
    assert inject(root, "bob@box", data=b"\nhi\n", env=env).returncode == 0
    [(_, envelope, message)] = queued(root)
    assert envelope.sender == "bounce@example.com"
    assert envelope.recipients == ("bob@box.example.org",)
    assert b'From: "Web Shop" <web@example.com>\r\n' in message
    assert re.search(rb"Message-ID: <\d{14}\.\d+\.qmail@id\.example\.com>\r\n", message)


def test_errors_are_one_line_with_qmail_injects_exit_codes(root, tmp_path):
    cases = [
        (inject(root, data=b"Subject: nobody\n\nhi\n"), 100, "Error: no recipients"),
        # `qrelay inject ROOT "$RCPT"` with RCPT unset: not queued to `@defaulthost`,
        # which local delivery drops as qmail-lspawn does (exit 0, the mail gone)
        (inject(root, "", data=b"Subject: empty\n\nhi\n"), 100, "Error: no recipients"),
        (inject(root, "<>", data=b"To: bob@example.net\n\nhi\n"), 100, "Error: no recipients"),
        (inject(root, "bob@example.net", data=b"Subject: x\n\nnul \0 here\n"), 100,
         "Error: message contains NUL bytes"),
        (inject(root, "bob@example.net", data=b"From: \"unterminated\n\nhi\n"), 100,
         "Error: unable to parse this line: From: \"unterminated"),
        (inject(root, "-x", "bob@example.net", data=b""), 100, "Error: usage: No such option '-x'."),
        (inject(tmp_path / "nowhere", "bob@example.net", data=b"\nhi\n"), 111,
         f"Error: {tmp_path / 'nowhere'}: no such qrelay root (no control/ directory)"),
    ]
    for done, status, line in cases:
        assert (done.returncode, done.stderr.decode().splitlines()) == (status, [line])
    assert queued(root) == []


def test_qmail_injects_a_h_A_H_choose_the_recipients(root):
    """A script ported from qmail-inject: `-h` is the header's recipients
    only (it printed the help and exited 0, the message lost)."""
    data = b"To: t@example.net\nSubject: s\n\nhi\n"
    for flag, expected in (("-h", ("t@example.net",)), ("-a", ("a@example.net",)),
                           ("-A", ("a@example.net",)),
                           ("-H", ("a@example.net", "t@example.net"))):
        done = inject(root, "-n", flag, "a@example.net", data=data)
        assert done.returncode == 0, (flag, done.stderr)
        rcpts = tuple(line[len("Recipient: "):] for line in done.stdout.decode().splitlines()
                      if line.startswith("Recipient: "))
        assert rcpts == expected, flag
    helped = inject(root, "--help", data=b"")
    assert helped.returncode == 0 and b"-h " in helped.stdout
    assert queued(root) == []


def test_a_qmail_queue_is_not_written_into(root):
    for d in ("mess", "todo", "info"):
        (root / "queue" / d).mkdir()
    done = inject(root, "bob@example.net", data=b"\nhi\n")
    assert done.returncode == 111
    assert "holds a qmail queue" in done.stderr.decode()


def test_root_defaults_to_qrelay_root_and_n_prints_instead_of_queueing(root):
    done = run(["-m", "engine.cli", "inject", "-n", "bob"], b"Subject: s\n\nhi\n",
               {"QRELAY_ROOT": str(root), "USER": "alice"})
    assert done.returncode == 0, done.stderr
    out = done.stdout.decode().splitlines()
    assert out[:2] == ["Return-Path: <alice@mx.example.com>", "Recipient: bob@mx.example.com"]
    assert out[-2:] == ["", "hi"]
    assert queued(root) == []


def test_inject_goes_through_a_running_spool_writer(root):
    from tests.smtp_harness import RunningQrelay
    from tests.test_delivery_e2e import wait_for
    server = RunningQrelay(root, procs=1)
    try:
        # The receivers greet before the writer may have its socket up.
        wait_for(lambda: (root / "queue" / "writer.sock").exists(), what="the spool writer's socket")
        done = inject(root, "bob@example.net", data=b"Subject: live\n\nhi\n")
        assert done.returncode == 0, done.stderr
    finally:
        assert server.stop() == 0
    [(info, envelope, message)] = queued(root)
    assert (info.origin, envelope.recipients) == ("local", ("bob@example.net",))
    assert b"Subject: live\r\n" in message


def test_a_message_over_the_spool_frame_limit_is_a_permanent_error(root):
    """Within max_message_bytes as read (LF line ends), a message may be
    twice that stored (CRLF): over [spool] max_frame_bytes the writer never
    takes it, so a 111 had the caller (cron, PHP's mail()) retry for ever.
    It is 100, as SMTP answers 552; through queue/inject.sock (any local
    user) too, where the writer closed the connection on it."""
    from tests.smtp_harness import RunningQrelay
    from tests.test_delivery_e2e import wait_for
    (root / "qrelay.toml").write_text(
        "[smtp]\nmax_message_bytes = 4194304\nmax_recipients = 100\nmax_line_length = 512\n"
        "[spool]\nmax_frame_bytes = 5300000\n")
    data = b"Subject: log\n\n" + b"\n" * (4 * 1000 * 1000)
    server = RunningQrelay(root, procs=1)
    try:
        wait_for(lambda: (root / "queue" / "writer.sock").exists(), what="the spool writer's socket")
        refused = [inject(root, "bob@example.net", data=data)]
        if os.geteuid() == 0:
            refused.append(subprocess.run(
                [sys.executable, "-m", "engine.cli", "inject", str(root), "bob@example.net"],
                input=data, cwd="/", capture_output=True, timeout=60, user=65534, group=65534,
                extra_groups=[], env={**BASE_ENV, "PYTHONPATH": str(REPO), "USER": "www"}))
        assert all(r.returncode == 100 for r in refused), [r.stderr for r in refused]
        assert all(b"max_frame_bytes" in r.stderr for r in refused), [r.stderr for r in refused]
        assert inject(root, "bob@example.net", data=b"Subject: small\n\nhi\n").returncode == 0
    finally:
        assert server.stop() == 0
    assert len(queued(root)) == 1


def test_an_address_longer_than_the_spool_holds_is_a_permanent_error(root):
    # The spool's index records hold 65,535 bytes an address: one longer
    # stopped every index commit after it; now it is refused first, 100.
    r = inject(root, "a" * 70_000 + "@far.test", data=b"Subject: x\n\nhi\n")
    assert r.returncode == 100, r.stderr
    assert b"an envelope address is over the spool's 65535 bytes" in r.stderr
    assert inject(root, "bob@example.net", data=b"Subject: small\n\nhi\n").returncode == 0
    assert len(queued(root)) == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users")
def test_any_local_user_queues_through_the_injection_socket(root):
    """PHP's mail() as www-data: the spool belongs to the run user, so another
    user queues through queue/inject.sock; the writer takes the uid and pid from
    the kernel (a client's own claim is ignored) and writes the Received line."""
    from engine.queue import Envelope
    from engine.queue.writer import SpoolClient
    from tests.smtp_harness import RunningQrelay
    from tests.test_delivery_e2e import wait_for

    def as_nobody(*args: str, data: bytes):
        return subprocess.run([sys.executable, "-m", "engine.cli", "inject", str(root), *args],
                              input=data, cwd="/", capture_output=True, timeout=60, user=65534,
                              group=65534, extra_groups=[],
                              env={**BASE_ENV, "PYTHONPATH": str(REPO), "USER": "www"})

    (root / "qrelay.toml").write_text("[scheduler]\nenabled = false\n")
    refused = as_nobody("bob@example.net", data=b"\nhi\n")
    assert refused.returncode == 111 and b"inject.sock" in refused.stderr, refused.stderr
    server = RunningQrelay(root, procs=1)
    try:
        sock = root / "queue" / "inject.sock"
        wait_for(lambda: sock.exists(), what="the injection socket")
        assert sock.stat().st_mode & 0o777 == 0o666
        done = as_nobody("bob@example.net", data=b"Subject: from php\n\nhi\n")
        assert done.returncode == 0, done.stderr
        client = SpoolClient(sock)       # root here: a claimed uid 4242 is not believed
        client.enqueue(Envelope("x@y.z", ("c@example.net",), pid=1, uid=4242, origin="network"),
                       b"Subject: claim\r\n\r\nx\r\n")
        client.close()
    finally:
        assert server.stop() == 0
    # A stopped qrelay run leaves the socket: the same one line as with none.
    stale = as_nobody("bob@example.net", data=b"\nhi\n")
    assert stale.returncode == 111 and stale.stderr == refused.stderr, (stale.stderr, refused.stderr)
    got = {envelope.recipients[0]: (info, message) for info, envelope, message in queued(root)}
    info, message = got["bob@example.net"]
    assert (info.uid, info.origin) == (65534, "local")
    assert message.startswith(b"Received: (qmail %d invoked by uid 65534); " % info.pid)
    assert message.count(b"Received: ") == 1
    info, message = got["c@example.net"]
    assert (info.uid, info.origin) == (0, "local") and message.startswith(b"Received: (qmail ")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to own a spool as another user")
def test_as_root_a_spool_owned_by_another_user_keeps_its_owner():
    top = Path(tempfile.mkdtemp(prefix="qrelay-inject-"))
    try:
        os.chmod(top, 0o755)
        from engine.home import init_home
        root = init_home(top / "qrelay", me="mx.example.com")
        os.chown(root / "queue", 65534, 65534)
        done = inject(root, "bob@example.net", data=b"\nhi\n")
        assert done.returncode == 0, done.stderr
        owners = {p.stat().st_uid for p in (root / "queue").rglob("*")}
        assert owners == {65534}
        [(info, _, _)] = queued(root)
        assert info.uid == 0            # the caller, not the spool's owner
    finally:
        shutil.rmtree(top)


# --------------------------------------------------------------------------- qmail-inject's rules

def p(data: bytes, **kw):
    kw.setdefault("identity", ALICE)
    return prepare(data, names=NAMES, now=1_700_000_000, pid=4242, **kw)


def test_addresses_are_qualified_as_qmail_inject_does():
    got = p(b"To: joe, ann@host, bob@shop+, <@relay:sue@example.net>, lit@[10.0.0.1], "
            b'"odd name"@x.org, (c) ken@ex.org (comment)\n\nhi\n')
    assert got.recipients == ("joe@mx.example.com", "ann@host.example.com",
                              "bob@shop.plus.example.com", "sue@example.net", "lit@[10.0.0.1]",
                              "odd name@x.org", "ken@ex.org")
    assert got.message.splitlines()[3] == (
        b'To: joe@mx.example.com, ann@host.example.com, bob@shop.plus.example.com, '
        b'<sue@example.net>, lit@[10.0.0.1], "odd name"@x.org, (c) ken@ex.org (comment)')


def test_fixed_date_message_id_and_from_forms():
    lines = p(b"\nhi\n", arguments=["bob@example.net"]).message.split(b"\r\n")
    assert lines[:4] == [b"Date: 14 Nov 2023 22:13:20 -0000",
                         b"Message-ID: <20231114221320.4242.qmail@mx.example.com>",
                         b"From: alice@mx.example.com", b"Cc: recipient list not shown: ;"]
    named = Identity(user="web", host="shop.example.com", full_name='Shop "A"',
                     return_user="web", return_host="shop.example.com")
    assert b'From: "Shop \\"A\\"" <web@shop.example.com>\r\n' in p(
        b"\nhi\n", arguments=["b@x.org"], identity=named).message
    comment = Identity(user="web", host=None, full_name="Shop", return_user="web",
                       return_host=None, name_as_comment=True)
    assert b"From: web@mx.example.com (Shop)\r\n" in p(
        b"\nhi\n", arguments=["b@x.org"], identity=comment).message


def test_existing_fields_are_kept_and_nothing_is_added_twice():
    data = (b"Date: Mon, 1 Jan 2024 00:00:00 +0000\nMessage-ID: <a@b>\nFrom: x@y.org\n"
            b"To: z@y.org\n\nhi\n")
    assert p(data).message == data.replace(b"\n", b"\r\n")


def test_return_path_gives_the_sender_and_is_removed_f_wins():
    data = b"Return-Path: <list-bounce@lists>\nContent-Length: 99\nTo: z@y.org\n\nhi\n"
    got = p(data)
    assert got.sender == "list-bounce@lists.example.com"
    assert b"Return-Path" not in got.message and b"Content-Length" not in got.message
    assert p(data, sender="me@here.org").sender == "me@here.org"
    assert p(b"Return-Path: <>\nTo: z@y.org\n\nhi\n").sender == ""
    assert p(data, identity=Identity("alice", None, None, "alice", None,
                                     ignore_return_path=True)).sender == "alice@mx.example.com"


def test_angle_brackets_around_f_and_a_looping_message():
    assert p(b"\nhi\n", arguments=["<b@x.org>"], sender="<me@here.org>").sender == "me@here.org"
    looping = b"Received: x\n" * 60 + b"Delivered-To: b@x.org\n" * 41 + b"\nhi\n"
    assert p(looping, arguments=["b@x.org"], max_hops=102).recipients == ("b@x.org",)
    with pytest.raises(InjectError) as exc:
        p(looping, arguments=["b@x.org"], max_hops=101)
    assert (str(exc.value), exc.value.status) == ("too many hops, this message is looping", 100)


def test_resent_fields_choose_the_recipients_and_the_added_fields():
    data = b"To: old@y.org\nResent-To: new@y.org\nResent-Bcc: hidden@y.org\nFrom: a@y.org\n\nhi\n"
    got = p(data)
    assert got.recipients == ("new@y.org", "hidden@y.org")
    lines = got.message.split(b"\r\n")
    assert [l.split(b":")[0] for l in lines[:3]] == [b"Resent-Date", b"Resent-Message-ID",
                                                      b"Resent-From"]
    assert b"hidden" not in got.message


def test_header_ends_where_qmail_ends_it():
    got = p(b"From someone Mon Jan  1 00:00:00 2024\nSubject: s\nthis is body\nmore\n",
            arguments=["b@x.org"])
    assert got.message.endswith(b"MBOX-Line: From someone Mon Jan  1 00:00:00 2024\r\n"
                                b"Subject: s\r\n\r\nthis is body\r\nmore\r\n")
    folded = p(b"Subject: a\n  folded\nTo: b@x.org,\n c@x.org\n\nhi\n")
    assert folded.recipients == ("b@x.org", "c@x.org")
    assert b"To: b@x.org,\r\n c@x.org\r\n" in folded.message


def test_a_bare_cr_in_the_header_starts_no_field_of_its_own():
    """qmail-inject keeps `Subject: hi<CR>Bcc: x` as one Subject field: a bare
    CR there (a web form's subject) must not add a Bcc recipient nor end the
    header; in the stored header it is a space, in the body a line end."""
    got = p(b"Subject: hi\rBcc: victim@evil.example\nTo: b@x.org\nX-A: 1\r\n\nbody\rmore\n",
            header_recipients=True)
    assert got.recipients == ("b@x.org",)
    assert got.message.split(b"\r\n")[3:] == [
        b"Subject: hi Bcc: victim@evil.example", b"To: b@x.org", b"X-A: 1", b"",
        b"body", b"more", b""]
    # A line that starts with a bare CR is no field: the header ends there.
    got = p(b"To: b@x.org\n\rBcc: victim@evil.example\n\nbody\n", header_recipients=True)
    assert got.recipients == ("b@x.org",)
    assert got.message.split(b"\r\n")[3:] == [
        b"To: b@x.org", b"", b"", b"Bcc: victim@evil.example", b"", b"body", b""]


def test_a_body_of_many_short_lines_is_not_held_line_by_line():
    """A cron job mailing a big log: 64 MiB of short lines took 3 GB and 13 s
    as one Python string per line. The body stays bytes: a few copies at most."""
    import tracemalloc
    data = b"Subject: log\n\n" + b"ab\n" * 1_000_000 + b"old mac\rlast"
    tracemalloc.start()
    try:
        got = p(data, arguments=["b@x.org"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got.message.endswith(b"Subject: log\r\n\r\n" + b"ab\r\n" * 1_000_000
                                + b"old mac\r\nlast\r\n")
    assert peak < 5 * len(data), peak


def test_an_unparsable_to_gives_nobody_and_arguments_alone_with_a():
    assert p(b"To: Joe Smith\nCc: ok@x.org\n\nhi\n").recipients == ("ok@x.org",)
    assert p(b"To: t@x.org\n\nhi\n", arguments=["a@x.org"]).recipients == ("a@x.org",)
    assert p(b"To: t@x.org\n\nhi\n", arguments=["a@x.org"],
             header_recipients=True).recipients == ("a@x.org", "t@x.org")
    with pytest.raises(InjectError) as exc:
        p(b"To: t@x.org\n\nhi\n", arguments=["a@x.org"], header_recipients=False,
          sender="bad\nsender")
    assert exc.value.status == 100


# --------------------------------------------------------------------------- sendmail

def test_sendmail_t_i_as_php_calls_it(root):
    data = b"To: customer@example.net\nSubject: Your order\n\nThanks.\n.\nStill the body.\n"
    done = sendmail(root, "-t", "-i", data=data, env={"USER": "www-data"})
    assert done.returncode == 0, done.stderr
    [(info, envelope, message)] = queued(root)
    assert envelope.sender == "www-data@mx.example.com"
    assert envelope.recipients == ("customer@example.net",)
    assert info.origin == "local"
    assert message.endswith(b"\r\n\r\nThanks.\r\n.\r\nStill the body.\r\n")
    assert b"From: www-data@mx.example.com\r\n" in message


def test_sendmail_t_to_every_local_user_by_name_is_qualified_in_linear_time(root):
    # An admin's `sendmail -t` with To: of 200,000 host-less names: each is
    # rewritten in place; a slice per rewrite made that minutes of CPU.
    names = [f"u{i}" for i in range(200_000)]
    data = ("To: " + ",\n ".join(names) + "\nSubject: all\n\nhi\n").encode()
    done = sendmail(root, "-t", data=data)      # run()'s bound: 60 s
    assert done.returncode == 0, done.stderr
    [(_, envelope, message)] = queued(root)
    assert envelope.recipients == tuple(f"{n}@mx.example.com" for n in names)
    assert b"To: u0@mx.example.com,\r\n u1@mx.example.com,\r\n" in message
    assert b" u199999@mx.example.com\r\nSubject: all\r\n\r\nhi\r\n" in message


def test_sendmail_f_and_F_and_the_options_cron_and_php_pass(root):
    done = sendmail(root, "-FCronDaemon", "-i", "-B8BITMIME", "-oem", "-odi", "-oi",
                    "-fcron@example.com", "root", data=b"Subject: cron job\n\noutput\n")
    assert done.returncode == 0, done.stderr
    done = sendmail(root, "-t", "-f", "shop@example.com", "-odb", "copy@example.org",
                    data=b"To: a@example.net\n\nhi\n")
    assert done.returncode == 0, done.stderr
    (_, first, m1), (_, second, _) = queued(root)
    assert (first.sender, first.recipients) == ("cron@example.com", ("root@mx.example.com",))
    assert b'From: "CronDaemon" <cron@example.com>\r\n' in m1
    assert (second.sender, second.recipients) == ("shop@example.com",
                                                  ("copy@example.org", "a@example.net"))


def test_sendmail_bad_options_exit_64_in_one_line(root):
    for args, text in ((["-Z"], "unknown option -Z"), (["-bd"], "unsupported option -bd"),
                       (["-q30m"], "unsupported option -q30m (only -q: flush now)"), (["-f"], "option -f needs a value")):
        done = sendmail(root, *args)
        lines = done.stderr.decode().splitlines()
        assert done.returncode == 64 and len(lines) == 1, (args, done.stderr)
        assert lines[0].startswith(f"sendmail: {text}; usage: sendmail ")
    assert queued(root) == []


def test_sendmail_arguments_parse_like_getopt():
    a = parse_sendmail_args(["-ti", "-f", "x@y", "--", "-notanoption"])
    assert (a.headers, a.sender, a.recipients) == (True, "x@y", ("-notanoption",))
    assert parse_sendmail_args(["-bs"]).mode == "smtp"
    assert parse_sendmail_args(["-bp"]).mode == "list"
    assert parse_sendmail_args([], prog="/usr/bin/mailq").mode == "list"
    assert parse_sendmail_args(["-q"]).mode == "flush"
    assert parse_sendmail_args(["bob", "-t"]).recipients == ("bob", "-t")
    with pytest.raises(UsageError):
        parse_sendmail_args(["-bz"])


@contextmanager
def sendmail_process(root: Path, *args: str):
    """This interpreter running ARGS (default `-m engine.inject -bs`, sendmail
    -bs) on pipes for ROOT; killed if still running, pipes closed, on the way out."""
    proc = subprocess.Popen([sys.executable, *(args or ("-m", "engine.inject", "-bs"))],
                            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE,
                            env={**BASE_ENV, "PYTHONPATH": str(REPO), "QRELAY_ROOT": str(root)})
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdin.close()
        proc.stdout.close()
        proc.stderr.close()


def test_sendmail_as_newaliases_refuses_in_one_line_without_reading_stdin(root):
    # Debian's /usr/bin/newaliases is a link to /usr/sbin/sendmail, and package
    # scripts run it: as qmail's sendmail, one fatal line and 100; it read the
    # (possibly never closed) stdin as a message and then said "no recipients".
    with sendmail_process(root, "-c", "from engine.inject import sendmail_main; "
                          "sendmail_main(['/usr/bin/newaliases'])") as proc:
        assert proc.wait(timeout=20) == 100
        lines = proc.stderr.read().decode().splitlines()
        assert len(lines) == 1 and lines[0].startswith("sendmail: fatal: "), lines
        assert "newaliases" in lines[0]
    assert queued(root) == []


def test_sendmail_bs_speaks_smtp_on_stdin_and_stdout(root):
    dialogue = (b"EHLO client\r\nMAIL FROM:<app@example.com>\r\nRCPT TO:<far@example.net>\r\n"
                b"DATA\r\nSubject: bs\r\n\r\nhello\r\n.\r\nQUIT\r\n")
    done = sendmail(root, "-bs", data=dialogue)
    assert done.returncode == 0, done.stderr
    replies = done.stdout.split(b"\r\n")
    assert replies[0] == b"220 mx.example.com ESMTP"
    assert [r[:3] for r in replies if r[:1].isdigit() and r[3:4] == b" "] == [
        b"220", b"250", b"250", b"250", b"354", b"250", b"221"]
    assert re.search(rb"\r\n250 ok \d+ qp \d+\r\n221 mx.example.com\r\n$", done.stdout)
    [(info, envelope, message)] = queued(root)
    assert (envelope.sender, envelope.recipients) == ("app@example.com", ("far@example.net",))
    assert (info.origin, info.uid) == ("local", os.getuid())
    lines = header_of(message)
    assert re.fullmatch(rb"Received: \(qmail \d+ invoked by uid %d\); .* -0000" % os.getuid(), lines[0])
    assert lines[1] == b"Received: from localhost (HELO client) (sendmail-bs@127.0.0.1)"
    assert lines[2].startswith(b"  by localhost with SMTP; ")


def test_sendmail_bs_client_that_leaves_after_its_dot_still_gets_its_message(root):
    dialogue = (b"HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<x@example.net>\r\nDATA\r\nhi\r\n.\r\n")
    done = sendmail(root, "-bs", data=dialogue)
    assert done.returncode == 0, done.stderr
    assert re.search(rb"\r\n250 ok \d+ qp \d+\r\n$", done.stdout)
    assert len(queued(root)) == 1


def test_sendmail_bp_lists_the_queue_and_q_flushes(root):
    assert sendmail(root, "bob@example.net", data=b"\nhi\n").returncode == 0
    listing = sendmail(root, "-bp")
    assert listing.returncode == 0
    assert re.search(rb"#\d+  \d+  <alice@mx\.example\.com> \n\ttodo\tbob@example\.net\n",
                     listing.stdout)
    flushed = sendmail(root, "-q")
    assert flushed.returncode == 0
    assert b"deferred recipients due now" in flushed.stdout


def test_sendmail_bs_turn_by_turn_with_stdin_left_open(root):
    # As Symfony Mailer's `sendmail -bs` transport talks: one command, one reply,
    # and the process must exit after QUIT although stdin is still open.
    with sendmail_process(root) as proc:
        def reply() -> bytes:
            lines = []
            while True:
                line = proc.stdout.readline()
                lines.append(line)
                if line[3:4] != b"-":
                    return b"".join(lines)

        def say(line: bytes) -> bytes:
            proc.stdin.write(line + b"\r\n")
            proc.stdin.flush()
            return reply()

        assert reply().startswith(b"220 ")
        assert say(b"EHLO app").endswith(b"250 SIZE 67108864\r\n")
        assert say(b"MAIL FROM:<app@example.com>") == b"250 ok\r\n"
        assert say(b"RCPT TO:<b@example.net>") == b"250 ok\r\n"
        assert say(b"DATA") == b"354 go ahead\r\n"
        assert say(b"Subject: turn\r\n\r\nhi\r\n.").startswith(b"250 ok ")
        assert say(b"QUIT") == b"221 mx.example.com\r\n"
        assert proc.wait(timeout=20) == 0
    assert len(queued(root)) == 1


def test_sendmail_interrupted_dies_quietly_as_qmail_inject_does(root):
    # Ctrl-C on `sendmail bob` being typed, or on a `sendmail -bs` dialogue:
    # the process ends by the signal, nothing queued, no Python traceback.
    import signal
    with sendmail_process(root) as proc:
        assert proc.stdout.readline().startswith(b"220 ")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == -signal.SIGINT
        assert proc.stderr.read() == b""
    assert queued(root) == []


def test_sendmail_bs_starttls_works_on_the_pipe(root):
    # With control/servercert.pem, -bs offers STARTTLS as qmail-smtpd does under
    # qmail's sendmail; a client that takes the offer must get a working TLS
    # session on stdin/stdout, not a dropped pipe after `220 ready for tls`.
    import ssl

    from tests.smtp_harness import install_certificate
    install_certificate(root)
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing)

    def send(data: bytes) -> None:
        proc.stdin.write(data)
        proc.stdin.flush()

    def receive() -> None:
        send(outgoing.read())
        data = os.read(proc.stdout.fileno(), 1 << 16)
        assert data, "sendmail -bs closed the pipe"
        incoming.write(data)

    def say(line: bytes) -> bytes:
        tls.write(line + b"\r\n")
        got = b""
        while not re.search(rb"(^|\n)\d{3} [^\n]*\r\n$", got):
            try:
                got += tls.read(1 << 16)
            except ssl.SSLWantReadError:
                receive()
        return got

    with sendmail_process(root) as proc:
        assert proc.stdout.readline().startswith(b"220 ")
        send(b"EHLO app\r\n")
        ehlo = b""
        while not ehlo.endswith(b"250 SIZE 67108864\r\n"):
            ehlo += proc.stdout.readline()
        assert b"250-STARTTLS\r\n" in ehlo
        send(b"STARTTLS\r\n")
        assert proc.stdout.readline() == b"220 ready for tls\r\n"
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                receive()
        assert say(b"EHLO app").startswith(b"250-mx.example.com\r\n")
        assert say(b"MAIL FROM:<app@example.com>") == b"250 ok\r\n"
        assert say(b"RCPT TO:<b@example.net>") == b"250 ok\r\n"
        assert say(b"DATA") == b"354 go ahead\r\n"
        assert say(b"Subject: tls\r\n\r\nhi\r\n.").startswith(b"250 ok ")
        assert say(b"QUIT") == b"221 mx.example.com\r\n"
        assert proc.wait(timeout=20) == 0
    [(_, envelope, message)] = queued(root)
    assert envelope.recipients == ("b@example.net",)
    assert b"by localhost with ESMTPS (" in message


def test_sendmail_f_in_angle_brackets_gives_a_plain_from(root):
    # `sendmail -f '<bounce@…>'` (as some PHP apps pass it): the brackets are the
    # address's, not its local part's; From must not become `"<bounce"@shop…>`.
    done = sendmail(root, "-f", "<bounce@shop.example.com>", "-F", "Shop", "bob@example.net",
                    data=b"Subject: order\n\nhi\n")
    assert done.returncode == 0, done.stderr
    [(_, envelope, message)] = queued(root)
    assert envelope.sender == "bounce@shop.example.com"
    assert b'From: "Shop" <bounce@shop.example.com>\r\n' in message


def test_a_closed_stdin_is_a_one_line_read_error(root):
    # qmail-inject's die_read: 111 and one line, not a traceback (fd 0 closed
    # by a daemon that runs `sendmail user <&-`).
    env = {**BASE_ENV, "PYTHONPATH": str(REPO), "USER": "alice", "QRELAY_ROOT": str(root)}
    for args, prefix in ((["-m", "engine.inject", "bob@example.net"], "sendmail: fatal: "),
                         (["-m", "engine.cli", "inject", str(root), "bob@example.net"], "Error: ")):
        done = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=False,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60,
                              env=env, preexec_fn=lambda: os.close(0))
        assert (done.returncode, done.stderr.decode().splitlines()) == (
            111, [prefix + "read error: standard input is closed"]), done.stderr
    assert queued(root) == []


def test_n_with_stdout_closed_or_gone_is_a_one_line_write_error(root):
    # -n prints the message: standard output closed (>&-) or a reader gone
    # (`| head -0`) is qmail-inject's write error, 111 and one line, never a
    # traceback or click's silent exit 1.
    env = {**BASE_ENV, "PYTHONPATH": str(REPO), "USER": "alice"}
    args = [sys.executable, "-m", "engine.cli", "inject", str(root), "-n", "bob@example.net"]
    closed = subprocess.run(args, cwd=REPO, input=b"Subject: s\n\nhi\n", stdout=None,
                            stderr=subprocess.PIPE, timeout=60, env=env,
                            preexec_fn=lambda: os.close(1))
    assert (closed.returncode, closed.stderr.decode().splitlines()) == (
        111, ["Error: write error: standard output is closed"]), closed.stderr
    r, w = os.pipe()
    os.close(r)
    try:
        gone = subprocess.run(args, cwd=REPO, input=b"Subject: s\n\nhi\n", stdout=w,
                              stderr=subprocess.PIPE, timeout=60, env=env)
    finally:
        os.close(w)
    assert (gone.returncode, gone.stderr.decode().splitlines()) == (
        111, ["Error: write error: Broken pipe"]), gone.stderr
    assert queued(root) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users")
def test_sendmail_bs_as_any_local_user_queues_through_the_injection_socket(root):
    """Symfony Mailer's default transport is `sendmail -bs`, run as www-data: its
    messages go through queue/inject.sock like `sendmail -t`'s (the user cannot
    open the spool), with the kernel's uid in the one `invoked by uid` line."""
    from tests.smtp_harness import RunningQrelay
    from tests.test_delivery_e2e import wait_for

    def bs_as_nobody(data: bytes):
        return subprocess.run([sys.executable, "-m", "engine.inject", "-bs"], input=data,
                              cwd="/", capture_output=True, timeout=60, user=65534, group=65534,
                              extra_groups=[], env={**BASE_ENV, "PYTHONPATH": str(REPO),
                                                    "QRELAY_ROOT": str(root)})

    dialogue = (b"HELO app\r\nMAIL FROM:<app@example.com>\r\nRCPT TO:<far@example.net>\r\n"
                b"DATA\r\nSubject: symfony\r\n\r\nhello\r\n.\r\nQUIT\r\n")
    (root / "qrelay.toml").write_text("[scheduler]\nenabled = false\n")
    refused = bs_as_nobody(dialogue)
    assert refused.returncode == 111 and refused.stdout == b"", refused
    assert [b"inject.sock" in line for line in refused.stderr.splitlines()] == [True]
    server = RunningQrelay(root, procs=1)
    try:
        wait_for(lambda: (root / "queue" / "inject.sock").exists(), what="the injection socket")
        done = bs_as_nobody(dialogue)
    finally:
        assert server.stop() == 0
    assert done.returncode == 0, done.stderr
    assert re.search(rb"\r\n250 ok \d+ qp \d+\r\n221 mx.example.com\r\n$", done.stdout), done.stdout
    [(info, envelope, message)] = queued(root)
    assert (envelope.sender, envelope.recipients) == ("app@example.com", ("far@example.net",))
    assert (info.uid, info.origin) == (65534, "local")
    lines = header_of(message)
    assert re.fullmatch(rb"Received: \(qmail %d invoked by uid 65534\); .* -0000" % info.pid, lines[0])
    assert lines[1] == b"Received: from localhost (HELO app) (sendmail-bs@127.0.0.1)"
    assert message.count(b"Received: ") == 2 and b"invoked from network" not in message


def test_sendmail_r_is_f(root):
    # Sendmail's, Postfix's and Exim's old synonym for -f, which older PHP
    # frameworks (Zend_Mail's sendmail transport) pass: not a usage error.
    done = sendmail(root, "-t", "-i", "-r", "shop@example.com", data=b"To: a@example.net\n\nhi\n")
    assert done.returncode == 0, done.stderr
    assert parse_sendmail_args(["-rbounce@example.com"]).sender == "bounce@example.com"
    [(_, envelope, message)] = queued(root)
    assert (envelope.sender, envelope.recipients) == ("shop@example.com", ("a@example.net",))
    assert b"From: shop@example.com\r\n" in message


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users")
def test_sendmail_bp_and_q_for_a_user_who_cannot_read_the_spool_fail_in_one_line(root):
    # `mailq` as an ordinary user (qmail-qread: a fatal line, 111), not a traceback.
    assert sendmail(root, "bob@example.net", data=b"\nhi\n").returncode == 0
    for args in (["-bp"], ["-q"]):
        done = subprocess.run([sys.executable, "-m", "engine.inject", *args], cwd="/",
                              capture_output=True, timeout=60, user=65534, group=65534,
                              extra_groups=[], env={**BASE_ENV, "PYTHONPATH": str(REPO),
                                                    "QRELAY_ROOT": str(root)})
        lines = done.stderr.decode().splitlines()
        assert done.returncode == 111 and len(lines) == 1, (args, done.stderr)
        assert lines[0].startswith("sendmail: fatal: ") and "Permission denied" in lines[0]


def test_a_full_name_with_a_line_end_stays_in_its_from_line():
    # -F "$name" from a web form: with QMAILINJECT=c (name as comment) as without,
    # a CR or LF in it must not start a header field of its own.
    for as_comment in (False, True):
        who = Identity(user="web", host=None, full_name="Shop\r\nBcc: victim@example.org",
                       return_user="web", return_host=None, name_as_comment=as_comment)
        message = p(b"\nhi\n", arguments=["b@x.org"], identity=who).message
        assert b"\nBcc" not in message and b"\rBcc" not in message, message


def test_a_line_end_in_the_environment_stays_in_the_field_it_fills():
    # QMAILIDHOST, QMAILDEFAULTHOST, QMAILUSER, QMAILHOST from a script: a CR
    # or LF in it must neither start a field of its own nor leave a bare line end
    # in the stored message (the next hop may read it as the end of a line).
    import dataclasses
    for end in ("\n", "\r", "\r\n"):
        bad = f"X{end}X-Injected: 1"
        env = {"QMAILIDHOST": f"h.example{end}X-Injected: 1", "QMAILDEFAULTHOST": f'"{bad}"'}
        names = InjectNames.load("/nowhere", env)
        who = dataclasses.replace(ALICE, user=bad, host=f'"{bad}"')    # QMAILUSER, QMAILHOST
        for data in (b"Reply-To: bob\n\nhi\n", b"Resent-To: t@x.org\n\nhi\n"):
            message = prepare(data, names=names, identity=who, arguments=["b@x.org"],
                              sender="s@x.org", now=1_700_000_000, pid=4242).message
            assert re.search(rb"\r(?!\n)|(?<!\r)\n", message) is None, message
            assert b"\r\nX-Injected" not in message, message
