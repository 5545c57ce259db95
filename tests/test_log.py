"""engine/log.py: TAI64N labels, logsafe, qmail-send line formats, multilog rotation."""
from __future__ import annotations

import os
import re

from engine.log import QmailSendLog, format_line, logsafe, tai64n_label, tai64n_label_ns

STAMP = re.compile(r"^@[0-9a-f]{24} ")


def test_tai64n_label_matches_spec_example():
    # spec §6.7: 1700000000 s + 123456 us -> @400000006553f10a075bcbf4
    assert tai64n_label(1700000000.123456) == "@400000006553f10a075bcbf4"
    assert tai64n_label_ns(1700000000_123456_000) == "@400000006553f10a075bcbf4"


def test_tai64n_label_epoch_and_whole_seconds():
    assert tai64n_label(0) == "@400000000000000a000001f4"
    assert tai64n_label(1.9999999) == "@400000000000000c000001f4"


def test_format_line_example():
    assert format_line(1700000000.123456, "new msg 42") == "@400000006553f10a075bcbf4 new msg 42\n"


def test_logsafe_maps_like_qmail():
    assert logsafe("a b\nc%d\te\x7f\xff") == "a_b/c_d_e___"  # U+00FF is 2 UTF-8 bytes
    assert logsafe(b"Remote host said: 250 ok\n") == "Remote_host_said:_250_ok/"
    # wire bytes decoded with surrogateescape come back as the same bytes, then '_'
    assert logsafe(b"\xe9t\xe9".decode("utf-8", "surrogateescape")) == "_t_"


def _lines(path):
    return path.read_text().splitlines()


def test_qmail_send_lines(tmp_path):
    log = QmailSendLog(tmp_path, clock_ns=lambda: 1700000000_123456_000)
    log.status([("local", 0, 10), ("remote", 0, 20)])
    log.new_msg(1458518)
    log.info_msg(1458518, 430, "a@bench.local", 9508, 995)
    log.starting_delivery(1, 1458518, "remote", "x@sink.test")
    log.delivery(1, "K", "127.0.0.1 accepted message.\nRemote host said: 250 2.0.0 Ok\n")
    log.delivery(2, "Z", "Sorry, I wasn't able to establish an SMTP connection. (#4.4.1)\n")
    log.delivery(3, "D", "Sorry, no mailbox here by that name. (#5.1.1)\n")
    log.bounce_msg(1458518, 29209)
    log.end_msg(1458518)
    log.triple_bounce(7)
    log.status([("local", 0, 10), ("remote", 1, 20)], exiting=True)
    log.exiting()
    assert not (tmp_path / "current").exists() or (tmp_path / "current").read_text() == ""
    log.close()
    got = _lines(tmp_path / "current")
    assert all(line.startswith("@400000006553f10a075bcbf4 ") for line in got)
    texts = [line[26:] for line in got]
    assert texts == [
        "status: local 0/10 remote 0/20",
        "new msg 1458518",
        "info msg 1458518: bytes 430 from <a@bench.local> qp 9508 uid 995",
        "starting delivery 1: msg 1458518 to remote x@sink.test",
        "delivery 1: success: 127.0.0.1_accepted_message./Remote_host_said:_250_2.0.0_Ok/",
        "delivery 2: deferral: Sorry,_I_wasn't_able_to_establish_an_SMTP_connection._(#4.4.1)/",
        "delivery 3: failure: Sorry,_no_mailbox_here_by_that_name._(#5.1.1)/",
        "bounce msg 1458518 qp 29209",
        "end msg 1458518",
        "triple bounce: discarding bounce/7",
        "status: local 0/10 remote 1/20 exitasap",
        "status: exiting",
    ]


def test_forged_newline_cannot_make_a_line(tmp_path):
    log = QmailSendLog(tmp_path)
    log.info_msg(1, 10, "evil\nend msg 1@x", 1, 1)
    log.close()
    got = _lines(tmp_path / "current")
    assert len(got) == 1 and STAMP.match(got[0])
    assert got[0].endswith("from <evil/end_msg_1@x> qp 1 uid 1")


def test_warnings_and_alerts_are_worded_lines_with_their_spaces(tmp_path):
    # qmail-send's are ("warning: trouble opening local/4/123; will try again
    # later"): logsafe is for a variable part, and made the scheduler's lines
    # "warning: delivery_worker_0_killed_by_signal_9_with_3_jobs_in_flight;_restarting".
    log = QmailSendLog(tmp_path)
    log.warning("delivery worker 0 killed by signal 9 with 3 jobs in flight; restarting")
    log.alert("scheduler crashed: OSError('x\nend msg 1'); restarting")
    log.close()
    assert [line[26:] for line in _lines(tmp_path / "current")] == [
        "warning: delivery worker 0 killed by signal 9 with 3 jobs in flight; restarting",
        "alert: scheduler crashed: OSError('x/end msg 1'); restarting"]


def test_rotation_keeps_whole_lines_and_at_most_n_minus_1_files(tmp_path):
    ticks = iter(range(1700000000_000000000, 1800000000_000000000, 1_000_000))
    log = QmailSendLog(tmp_path, max_bytes=4096, max_files=3, clock_ns=lambda: next(ticks))
    for i in range(2000):
        log.new_msg(i)
        if i % 100 == 0:
            log.flush()
    log.close()
    names = sorted(os.listdir(tmp_path))
    rotated = [n for n in names if n.startswith("@")]
    assert "current" in names
    assert len(rotated) == 2               # n - 1
    assert all(n.endswith(".s") for n in rotated)
    for name in rotated:
        data = (tmp_path / name).read_bytes()
        assert data.endswith(b"\n")
        assert 4096 - 2000 <= len(data) <= 4096
        assert oct(os.stat(tmp_path / name).st_mode & 0o777) == "0o744"
    # newest lines survive in order: the last rotated file then current
    tail = _lines(tmp_path / rotated[-1]) + _lines(tmp_path / "current")
    nums = [int(line.rsplit(" ", 1)[1]) for line in tail]
    assert nums == list(range(nums[0], 2000))


def test_a_rotation_that_fails_leaves_current_marked_in_use(tmp_path, monkeypatch):
    """The rename of a rotation refused (the directory unwritable, say): the
    lines wait, and `current` is still 0644, multilog's mark of a file in use
    (0744 would tell the next start it was closed cleanly, not left by a crash)."""
    import errno
    ticks = iter(range(1700000000_000000000, 1800000000_000000000, 1_000_000))
    log = QmailSendLog(tmp_path, max_bytes=4096, max_files=10, clock_ns=lambda: next(ticks))
    real_rename = os.rename

    def refused(src, dst):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "rename", refused)
    for i in range(200):
        log.new_msg(i)
    log.flush()
    assert oct(os.stat(tmp_path / "current").st_mode & 0o777) == "0o644"
    assert not [n for n in os.listdir(tmp_path) if n.startswith("@")]
    monkeypatch.setattr(os, "rename", real_rename)
    log.flush()
    log.close()
    rotated = sorted(n for n in os.listdir(tmp_path) if n.startswith("@"))
    assert rotated and all(oct(os.stat(tmp_path / n).st_mode & 0o777) == "0o744" for n in rotated)
    lines = [line for n in [*rotated, "current"] for line in _lines(tmp_path / n)]
    assert [int(line.rsplit(" ", 1)[1]) for line in lines] == list(range(200))


def test_appends_to_cleanly_closed_current(tmp_path):
    (tmp_path / "current").write_text("@400000006553f10a075bcbf4 old line\n")
    os.chmod(tmp_path / "current", 0o744)
    log = QmailSendLog(tmp_path)
    log.end_msg(5)
    log.flush()
    assert oct(os.stat(tmp_path / "current").st_mode & 0o777) == "0o644"   # in use
    log.close()
    assert oct(os.stat(tmp_path / "current").st_mode & 0o777) == "0o744"   # finished
    got = _lines(tmp_path / "current")
    assert got[0].endswith("old line") and got[1].endswith("end msg 5")


def test_current_left_by_a_crash_becomes_dot_u(tmp_path):
    (tmp_path / "current").write_text("@400000006553f10a075bcbf4 torn line\n")
    os.chmod(tmp_path / "current", 0o644)
    log = QmailSendLog(tmp_path, clock_ns=lambda: 1700000000_123456_000)
    log.end_msg(6)
    log.close()
    assert sorted(os.listdir(tmp_path)) == ["@400000006553f10a075bcbf4.u", "current", "lock"]
    assert (tmp_path / "@400000006553f10a075bcbf4.u").read_text().endswith("torn line\n")
    assert _lines(tmp_path / "current")[0].endswith("end msg 6")


def test_current_is_marked_finished_by_its_last_writer_only(tmp_path):
    """Several processes write one `current` (the supervisor, the scheduler, a
    queue command): the first to stop leaves it 0644, in use; the last one
    marks it 0744, so a crash of those still writing is noticed at the next start."""
    a = QmailSendLog(tmp_path)
    b = QmailSendLog(tmp_path)
    a.new_msg(1)
    a.flush()
    b.new_msg(2)
    b.flush()
    a.close()
    assert oct(os.stat(tmp_path / "current").st_mode & 0o777) == "0o644"
    b.new_msg(3)
    b.close()
    assert oct(os.stat(tmp_path / "current").st_mode & 0o777) == "0o744"
    assert [line[26:] for line in _lines(tmp_path / "current")] == [
        "new msg 1", "new msg 2", "new msg 3"]
    # The last to stop marks the `current` of now, though another rotated it
    # after this one's last line.
    ticks = iter(range(1700000000_000000000, 1800000000_000000000, 1_000_000))
    a = QmailSendLog(tmp_path, max_bytes=4096, clock_ns=lambda: next(ticks))
    b = QmailSendLog(tmp_path, max_bytes=4096, clock_ns=lambda: next(ticks))
    a.new_msg(4)
    a.flush()
    for i in range(200):
        b.new_msg(i)
    b.flush()
    assert [n for n in os.listdir(tmp_path) if n.startswith("@")]
    b.close()
    a.close()
    assert oct(os.stat(tmp_path / "current").st_mode & 0o777) == "0o744"


def test_buffer_is_bounded(tmp_path):
    log = QmailSendLog(tmp_path, max_buffered_lines=10)
    for i in range(25):
        log.new_msg(i)
    assert log.dropped == 15
    log.flush()
    log.new_msg(25)
    log.close()
    got = _lines(tmp_path / "current")
    # the lines kept, then how many were lost (never silently, and said once)
    assert [line.split(" ", 1)[1] for line in got] == [f"new msg {i}" for i in range(10)] + [
        "warning: 15 log lines dropped while the log could not be written", "new msg 25"]


def test_disk_full_part_way_through_a_write_neither_tears_nor_repeats_a_line(tmp_path, monkeypatch):
    """A write the disk fills part way through (some bytes written, then
    ENOSPC): the next flush goes on from the byte it stopped at, as multilog
    retries its write, so the file holds every line once and whole."""
    import errno
    log = QmailSendLog(tmp_path)
    log.new_msg(0)
    log.flush()
    real_write = os.write
    room = [150]        # bytes the disk takes before it is full

    def full_disk_write(fd, data):
        if fd != log._fd:
            return real_write(fd, data)
        if room[0] == 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = real_write(fd, bytes(data[:room[0]]))
        room[0] -= n
        return n

    monkeypatch.setattr(os, "write", full_disk_write)
    for i in range(1, 10):
        log.new_msg(i)
    log.flush()                             # 150 bytes go in, then the disk is full
    log.flush()                             # still full: nothing more
    room[0] = 1 << 20                       # space again
    log.new_msg(10)
    log.flush()
    log.close()
    got = _lines(tmp_path / "current")
    assert [line.split(" ", 1)[1] for line in got] == [f"new msg {i}" for i in range(11)]
    assert all(STAMP.match(line) for line in got)


def test_several_processes_write_one_log(tmp_path):
    """The supervisor, the receivers and the scheduler all write ROOT/log: a
    later writer does not take the `current` in use for a crash's, and a
    rotation by one is followed by the others (no line lands in a rotated file
    after it was rotated, none is lost)."""
    ticks = iter(range(1700000000_000000000, 1800000000_000000000, 1_000_000))
    a = QmailSendLog(tmp_path, max_bytes=4096, max_files=50, clock_ns=lambda: next(ticks))
    a.new_msg(0)
    a.flush()
    b = QmailSendLog(tmp_path, max_bytes=4096, max_files=50, clock_ns=lambda: next(ticks))
    b.new_msg(1)
    b.flush()
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".u")]
    for i in range(2, 600):
        (a if i % 2 == 0 else b).new_msg(i)
        (a if i % 2 == 0 else b).flush()
    a.close()
    b.close()
    rotated = sorted(n for n in os.listdir(tmp_path) if n.startswith("@"))
    assert len(rotated) >= 3 and all(n.endswith(".s") for n in rotated)
    lines = [line for n in [*rotated, "current"] for line in _lines(tmp_path / n)]
    assert [int(line.rsplit(" ", 1)[1]) for line in lines] == list(range(600))
    for name in rotated:
        assert len((tmp_path / name).read_bytes()) <= 4096


def test_logging_records_land_in_the_log(tmp_path):
    import logging
    from engine.log import LogHandler
    log = QmailSendLog(tmp_path, clock_ns=lambda: 1700000000_123456_000)
    logger = logging.getLogger("qrelay.test-log-handler")
    handler = LogHandler(log)
    logger.addHandler(handler)
    try:
        logger.warning("receiver-0 (pid %d) exited with status %d; restarting", 42, 111)
        logger.error("two\nlines")
    finally:
        logger.removeHandler(handler)
    texts = [line[26:] for line in _lines(tmp_path / "current")]
    assert texts == ["warning: test-log-handler: receiver-0 (pid 42) exited with status 111; restarting",
                     "alert: test-log-handler: two/lines"]


def test_smtpd_log_tcpserver_fields_are_made_safe_as_tcpserver_does(tmp_path):
    from engine.log import SmtpdLog, tcpserver_safe
    assert tcpserver_safe("a b:c%d\xe9") == "a?b?c?d?"
    assert tcpserver_safe("h" * 120) == "h" * 100 + "..."
    woken = []
    log = SmtpdLog(tmp_path / "smtpd")
    log.on_first_line = lambda: woken.append(1)
    log.tcpserver_ok(7, ("mx:evil", "192.0.2.1", 25), ("", "2001:db8::1", "", 4242), deny=True)
    log.smtpd(7, "192.0.2.9", "553 sorry (#5.7.1)", "RCPT <a\nb@c>")
    assert woken == [1]              # one wake-up per batch, not per line
    log.flush()
    log.rblsmtpd("192.0.2.9", 8, "451 listed")
    assert woken == [1, 1]
    log.close()
    texts = [x[26:] for x in (tmp_path / "smtpd" / "current").read_text().splitlines()]
    assert texts == ["tcpserver: deny 7 mx?evil:192.0.2.1:25 :2001:db8::1::4242",
                     "smtpd: pid 7 from 192.0.2.9: RCPT <a_b@c>: 553 sorry (#5.7.1)",
                     "rblsmtpd: 192.0.2.9 pid 8: 451 listed"]


def _json_lines(path):
    import json
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_json_format_writes_the_same_events_one_object_per_line(tmp_path):
    log = QmailSendLog(tmp_path, clock_ns=lambda: 1700000000_123456_000, fmt="json")
    log.status([("local", 0, 10), ("remote", 1, 20)])
    log.new_msg(7)
    log.info_msg(7, 430, "a b@\xe9x.test", 9508, 995)
    log.starting_delivery(1, 7, "remote", "x@sink.test")
    log.delivery(1, "Z", "Sorry, I wasn't able to establish an SMTP connection. (#4.4.1)\n")
    log.bounce_msg(7, 8)
    log.end_msg(7)
    log.line("alert: unable to reread controls: control/smtproutes line 2")
    log.line("warning: quarantined #9")
    log.line("pop3d: joe@example.org:192.0.2.1: -ERR authorization failed")
    log.line("no word here")
    log.exiting()
    log.close()
    got = _json_lines(tmp_path / "current")
    assert {g["time"] for g in got} == {"2023-11-14T22:13:20.123456Z"}
    events = [{k: v for k, v in g.items() if k != "time"} for g in got]
    assert events == [
        {"event": "status", "exitasap": False, "local": {"running": 0, "limit": 10},
         "remote": {"running": 1, "limit": 20}},
        {"event": "new_msg", "msg": 7},
        {"event": "info_msg", "msg": 7, "bytes": 430, "sender": "a b@\xe9x.test", "qp": 9508,
         "uid": 995},
        {"event": "starting_delivery", "delivery": 1, "msg": 7, "channel": "remote",
         "recipient": "x@sink.test"},
        {"event": "delivery", "delivery": 1, "status": "deferral",
         "text": "Sorry, I wasn't able to establish an SMTP connection. (#4.4.1)\n"},
        {"event": "bounce_msg", "msg": 7, "qp": 8},
        {"event": "end_msg", "msg": 7},
        {"event": "alert", "text": "unable to reread controls: control/smtproutes line 2"},
        {"event": "warning", "text": "quarantined #9"},
        {"event": "pop3d", "text": "joe@example.org:192.0.2.1: -ERR authorization failed"},
        {"event": "line", "text": "no word here"},
        {"event": "exiting"},
    ]


def test_json_format_keeps_rotation_and_a_line_per_object(tmp_path):
    ticks = iter(range(1700000000_000000_000, 1800000000_000000_000, 1000))
    log = QmailSendLog(tmp_path, max_bytes=4096, max_files=3, clock_ns=lambda: next(ticks),
                       fmt="json")
    for i in range(400):
        log.delivery(i, "K", "line\nbreak \udce9")     # a wire byte: valid JSON all the same
    log.close()
    rotated = sorted(p for p in os.listdir(tmp_path) if p.startswith("@"))
    assert len(rotated) == 2
    for name in [*rotated, "current"]:
        for rec in _json_lines(tmp_path / name):
            assert rec["event"] == "delivery" and rec["text"] == "line\nbreak \ufffd"


def test_smtpd_log_json_format_and_log_handler(tmp_path):
    import logging
    from engine.log import LogHandler, SmtpdLog
    log = SmtpdLog(tmp_path / "smtpd", fmt="json", clock_ns=lambda: 1700000000_000001_000)
    woken = []
    log.on_first_line = lambda: woken.append(1)
    log.tcpserver_status(1, 500)
    log.tcpserver_pid(17, "192.0.2.8")
    log.tcpserver_ok(17, ("mx.example.net", "192.0.2.1", 25), ("", "192.0.2.8", "", 40112))
    log.smtpd(17, "192.0.2.8", "553 sorry (#5.7.1)", "RCPT <a\nb@c>")
    log.rblsmtpd("192.0.2.9", 18, "451 listed")
    log.tcpserver_end(17, 0)
    assert woken == [1]
    logger = logging.getLogger("qrelay.receiver.jsontest")
    logger.propagate = False
    handler = LogHandler(log)
    logger.addHandler(handler)
    try:
        logger.warning("receiver %d: %s", 3, "trouble")
    finally:
        logger.removeHandler(handler)
    log.close()
    got = [{k: v for k, v in g.items() if k != "time"}
           for g in _json_lines(tmp_path / "smtpd" / "current")]
    assert got == [
        {"event": "tcpserver_status", "connections": 1, "limit": 500},
        {"event": "tcpserver_pid", "pid": 17, "remoteip": "192.0.2.8"},
        {"event": "tcpserver_ok", "pid": 17, "localhost": "mx.example.net",
         "localip": "192.0.2.1", "localport": 25, "remotehost": "", "remoteip": "192.0.2.8",
         "remoteinfo": "", "remoteport": 40112},
        {"event": "smtpd", "pid": 17, "remoteip": "192.0.2.8", "command": "RCPT <a\nb@c>",
         "reply": "553 sorry (#5.7.1)"},
        {"event": "rblsmtpd", "remoteip": "192.0.2.9", "pid": 18, "reply": "451 listed"},
        {"event": "tcpserver_end", "pid": 17, "status": 0},
        {"event": "warning", "source": "receiver.jsontest", "text": "receiver 3: trouble"},
    ]


def test_log_format_setting(tmp_path):
    import pytest
    from engine.config.settings import SettingsError, load_settings
    assert load_settings(tmp_path).log.format == "qmail"
    (tmp_path / "qrelay.toml").write_text('[log]\nformat = "json"\n')
    assert load_settings(tmp_path).log.format == "json"
    (tmp_path / "qrelay.toml").write_text('[log]\nformat = "syslog"\n')
    with pytest.raises(SettingsError, match=r'\[log\] format = \'syslog\': expected one of "qmail", "json"'):
        load_settings(tmp_path)
