"""`qrelay doctor` (engine/doctor, engine/cli/doctor.py): every finding against a
real temp root; the network checks against the fake DNS server and loopback
sinks; --json; bad input (exit 2). The fix a finding offers is run where it
is a shell command, and the finding must be gone after it."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from engine.accounts import admin
from engine.cli import cli
from engine.queue import Deferred, Envelope, Spool
from tests.conftest import REPO, run_cli

ME = "mx.example.com"
# Domain directories need a non-root owner: as root one that is not ours.
UID, GID = (4242, 4242) if os.getuid() == 0 else (os.getuid(), os.getgid())


def doctor(root: Path, *args: str) -> tuple[int, dict]:
    r = CliRunner().invoke(cli, ["doctor", str(root), *args, "--json"], catch_exceptions=False,
                           env={"QRELAY_ROOT": ""})
    assert r.exit_code in (0, 1), r.output
    return r.exit_code, json.loads(r.output)


def findings(report: dict, check: str | None = None) -> list[dict]:
    return [f for f in report["findings"] if check is None or f["check"] == check]


def notes(report: dict, check: str) -> list[dict]:
    return [n for n in report["notes"] if n["check"] == check]


def run_fix(fix: str) -> None:
    """Run a finding's fix in bash, `qrelay` being this tree's CLI."""
    shim = f'qrelay() {{ PYTHONPATH={REPO} {sys.executable} -m engine.cli "$@"; }}\n'
    subprocess.run(["/bin/bash", "-c", shim + fix], check=True)


def user_dir(root: Path, address: str) -> Path:
    from engine.accounts import Accounts
    return Path(Accounts(root).mailbox(address).user.directory)


# The box's domain belongs to UID, which has no passwd entry to run the
# receivers as: they run as root (`[run] user = ""`) and read its vpasswd.
RUN_AS_ROOT = '[run]\nuser = ""\n'


def toml(root: Path, text: str, run: str = RUN_AS_ROOT) -> None:
    (root / "qrelay.toml").write_text(run + text)


@pytest.fixture(autouse=True)
def _alias_user(monkeypatch):
    """The box has qmail's alias user, so postmaster@ME has somewhere to go."""
    import pwd
    from types import SimpleNamespace
    real = pwd.getpwnam

    def getpwnam(name: str):
        if name == "alias":
            return SimpleNamespace(pw_name="alias", pw_uid=UID, pw_gid=GID, pw_dir="/nonexistent")
        return real(name)
    monkeypatch.setattr("pwd.getpwnam", getpwnam)


@pytest.fixture
def box(root: Path) -> Path:
    """ROOT with a vpopmail domain, two users and an alias: nothing wrong with it."""
    return healthy(root)


@pytest.fixture
def odd_box(tmp_path: Path) -> Path:
    """box under a root whose name a fix must quote: a space and a quote."""
    from engine.home import init_home
    return healthy(init_home(tmp_path / "it's a root", me=ME))


def healthy(root: Path) -> Path:
    admin.add_domain(root, "example.org", uid=UID, gid=GID)
    admin.add_user(root, "joe@example.org", "secret one")
    admin.add_user(root, "ann@example.org", "secret two")
    admin.add_alias(root, "info@example.org", ["joe@example.org"])
    admin.add_alias(root, "postmaster@example.org", ["joe@example.org"])
    toml(root, "[doctor]\ndisk_min_free_bytes = 0\ndisk_min_free_percent = 0.0\n")
    return root


def test_a_healthy_box_has_no_findings_and_exit_0(box):
    rc, report = doctor(box)
    assert rc == 0 and findings(report) == [], findings(report)
    assert report["problems"] == 0
    text = " ".join(n["text"] for n in report["notes"])
    assert "parse" in text and "agree" in text and "2 mailboxes" in text
    assert notes(report, "queue")[0]["messages"] == 0


def test_text_output_is_one_line_per_finding_with_its_fix(box):
    (box / "control" / "databytes").write_text("10MB\n")
    r = run_cli("doctor", str(box))
    assert r.returncode == 1, r.stderr
    problems = [line for line in r.stdout.splitlines() if line.startswith("problem: ")]
    assert problems and all("; fix: " in line for line in problems)
    assert any("databytes" in line and "qrelay run refuses to start" in line for line in problems)
    assert r.stdout.splitlines()[-1] == f"doctor: {len(problems)} problem" + \
        ("s" if len(problems) > 1 else "") + " found"


def test_a_domain_without_postmaster(box):
    for name in ("example.net", "example.com"):
        admin.add_domain(box, name, uid=UID, gid=GID)
    admin.add_alias_domain(box, "alias.example", "example.org")       # shares example.org's
    (f,) = findings(doctor(box)[1], "domains")
    assert f["what"] == "postmaster@example.com (and 1 more domains) has no mailbox, alias or catch-all"
    assert "RFC 5321 4.5.1" in f["why"]
    assert f["fix"] == (f"qrelay alias add {box} postmaster@example.com you@example.net "
                        "(the same for each)")
    admin.add_user(box, "postmaster@example.com", "pw")                # a mailbox will do
    assert admin.set_catchall(box, "example.net", "joe@example.org")  # so will a catch-all
    assert findings(doctor(box)[1], "domains") == []


def test_postmaster_with_nowhere_to_go(box, monkeypatch):
    monkeypatch.setattr("pwd.getpwnam", lambda name: (_ for _ in ()).throw(KeyError(name)))
    _, report = doctor(box)
    (f,) = findings(report, "domains")
    assert f["what"] == (f"postmaster@{ME} has nowhere to go: no users/assign entry, no system "
                         "user postmaster, no alias user")
    assert "Unable to find alias user!" in f["why"]
    assert f["fix"].startswith(f"useradd -r -d {box}/alias -s /usr/sbin/nologin alias && ")
    # An assign entry of its own is somewhere (qmail-lspawn reads users/assign first).
    (box / "alias").mkdir()
    os.chown(box / "alias", UID, GID)
    assign = box / "users" / "assign"
    lines = assign.read_text().splitlines()
    assign.write_text("\n".join(lines[:-1] + [f"=postmaster:alias:{UID}:{GID}:{box}/alias:::", "."])
                      + "\n")
    assert run_cli("newu", str(box)).returncode == 0
    assert findings(doctor(box)[1], "domains") == []


def test_control_files_that_do_not_parse(box):
    (box / "control" / "databytes").write_text("10MB\n")
    (box / "control" / "smtproutes").write_text("far.test\n")
    rc, report = doctor(box)
    got = findings(report, "controls")
    assert rc == 1
    databytes = next(f for f in got if "databytes" in f["what"])
    assert "'10MB' is not a number" in databytes["what"]
    assert databytes["fix"].endswith(str(box / "control" / "databytes"))
    routes = next(f for f in got if "smtproutes" in f["what"])
    assert "nothing is delivered" in routes["why"]
    (box / "control" / "databytes").write_text("0\n")     # the loader stops at the first
    (box / "control" / "rcpthosts").unlink()
    _, report = doctor(box)
    missing = next(f for f in findings(report, "controls") if "rcpthosts is missing" in f["what"])
    run_fix(missing["fix"])
    assert (box / "control" / "rcpthosts").read_text().strip() == ME


def test_a_users_assign_that_does_not_parse_is_one_finding(box):
    """One broken file, one line: the checks that need users/assign leave it
    to the controls check instead of adding `the check could not finish`."""
    assign = box / "users" / "assign"
    good = assign.read_text()
    assign.write_text("garbage\n" + good)
    rc, report = doctor(box)
    (f,) = findings(report)
    assert rc == 1 and f["check"] == "controls"
    assert f["what"] == "users/assign: bad format in users/assign (line 1: no key)"
    assert "qrelay newu refuses it" in f["why"]
    assert f["fix"] == f"${{EDITOR:-vi}} {assign} && qrelay newu {box}"
    assign.write_text(good)                     # the operator's edit
    run_fix(f["fix"].split(" && ", 1)[1])
    assert doctor(box)[0] == 0
    (box / "users" / "cdb").unlink()            # the text is the table: load_assign's finding
    assign.write_text("garbage\n" + good)
    (f,) = findings(doctor(box)[1])
    assert f["fix"] == f"${{EDITOR:-vi}} {assign}"


def test_stale_compiled_files_and_crlf(box):
    later = time.time() + 5
    os.utime(box / "users" / "assign", (later, later))
    (box / "control" / "tcp.smtp.cdb").write_bytes(b"")
    os.utime(box / "control" / "tcp.smtp.cdb", (1, 1))
    (box / "control" / "morercpthosts").write_text("more.example\n")
    (box / "control" / "concurrencyremote").write_bytes(b"20\r\n")
    _, report = doctor(box)
    got = {f["what"]: f for f in findings(report, "controls")}
    assert got["users/assign was changed after users/cdb was built"]["fix"] == f"qrelay newu {box}"
    assert got["control/tcp.smtp was changed after control/tcp.smtp.cdb was built"]["fix"] == \
        f"qrelay tcprules {box}"
    assert got["control/morercpthosts exists but control/morercpthosts.cdb was never built"]
    crlf = got["control/concurrencyremote has CRLF line endings"]
    run_fix(crlf["fix"])
    assert (box / "control" / "concurrencyremote").read_bytes() == b"20\n"


def test_a_qmail_queue_in_the_root(box):
    (box / "queue" / "mess").mkdir()
    _, report = doctor(box)
    f = next(f for f in findings(report, "controls") if "qmail queue" in f["what"])
    assert "refuses to start" in f["why"]
    run_fix(f["fix"].split(" (")[0])
    _, report = doctor(box)
    assert not any("qmail queue" in f["what"] for f in findings(report, "controls"))


def test_domains_accepted_but_not_delivered_and_the_reverse(box):
    control = box / "control"
    with open(control / "rcpthosts", "a") as f:
        f.write("orphan.test\nvirt.test\n")
    with open(control / "virtualdomains", "a") as f:
        f.write("virt.test:virt.test\nunlisted.test:example.org\n")
    assign = (box / "users" / "assign").read_text()
    (box / "users" / "assign").write_text(
        assign.replace("\n.\n", f"\n+ghost.test-:ghost.test:{UID}:{GID}:{box}/domains/"
                       "example.org:-::\n.\n"))
    admin.newu(box)
    _, report = doctor(box)
    got = {f["what"].split(" ")[0]: f for f in findings(report, "domains")}
    assert "relayed to its MX" in got["orphan.test"]["why"]
    assert got["orphan.test"]["fix"].startswith(f"qrelay domain add {box} orphan.test")
    assert "no +virt.test- line" in got["virt.test"]["what"]
    assert "not in rcpthosts" in got["unlisted.test"]["what"]
    assert "no virtualdomains line" in findings(report, "domains")[-1]["what"] or \
        any("+ghost.test-" in f["what"] for f in findings(report, "domains"))
    # the offered fixes, run, make those findings go away
    run_fix(got["virt.test"]["fix"])
    run_fix(got["unlisted.test"]["fix"])
    ghost = next(f for f in findings(report, "domains") if "+ghost.test-" in f["what"])
    run_fix(ghost["fix"])
    _, report = doctor(box)
    left = " ".join(f["what"] for f in findings(report, "domains"))
    assert "virt.test" not in left and "unlisted.test" not in left and "ghost" not in left
    assert "orphan.test" in left


def test_a_domain_in_both_locals_and_virtualdomains(box):
    # qmail-send tries locals first: example.org's virtualdomains line is dead,
    # joe@example.org goes to the alias user instead of joe's Maildir.
    with open(box / "control" / "locals", "a") as f:
        f.write("example.org\n")
    _, report = doctor(box)
    [got] = [f for f in findings(report, "domains") if "both locals and virtualdomains" in f["what"]]
    assert got["what"].startswith("example.org ")
    run_fix(got["fix"])
    assert "example.org" not in (box / "control" / "locals").read_text()
    _, report = doctor(box)
    assert not findings(report, "domains")


def test_permissions_and_owners_with_the_guides_fix(box):
    domain = box / "domains" / "example.org"
    os.chmod(domain, 0o777)
    os.chmod(domain / ".qmail-info", 0o666)
    joe = user_dir(box, "joe@example.org")
    (joe / "Maildir" / "new").rmdir()
    _, report = doctor(box)
    got = findings(report, "perms")
    home = next(f for f in got if f["what"] == f"{domain} is writable by everyone")
    assert "Uh-oh: home directory is writable. (#4.7.0)" in home["why"]
    assert home["fix"] == f"chmod o-w {domain}"
    dotqmail = next(f for f in got if ".qmail-info" in f["what"])
    assert "Uh-oh: .qmail file is writable. (#4.7.0)" in dotqmail["why"]
    missing = next(f for f in got if "Maildir/new does not exist" in f["what"])
    for f in got:
        run_fix(f["fix"])
    if os.getuid() == 0:
        assert os.stat(joe / "Maildir" / "new").st_uid == UID
    _, report = doctor(box)
    assert findings(report, "perms") == [], findings(report, "perms")
    assert missing


def test_a_hand_edited_or_malformed_vpasswd_and_the_fix(box):
    """vpasswd edited by hand after vpasswd.cdb (which lookups read) and a
    line that is no user: each found, and the printed fix works once the
    operator has mended the line (the edit is simulated below)."""
    domain = box / "domains" / "example.org"
    vpasswd = domain / "vpasswd"
    good = vpasswd.read_text()
    vpasswd.write_text(good + "ann:x:1:0\n")
    os.utime(domain / "vpasswd.cdb", (1, 1))
    _, report = doctor(box)
    stale, broken = findings(report, "perms")
    assert stale["what"] == f"{vpasswd} was changed after vpasswd.cdb was built"
    assert stale["fix"] == f"qrelay domain mkpasswd {box} example.org"
    assert broken["what"] == f"{vpasswd} line {good.count(chr(10)) + 1}: 4 fields, not 7 or 8 (skipped)"
    assert broken["fix"] == f"${{EDITOR:-vi}} {vpasswd} && {stale['fix']}"
    vpasswd.write_text(good)
    os.utime(vpasswd, (2, 2))
    run_fix(stale["fix"])
    assert findings(doctor(box)[1], "perms") == []


def test_a_vpasswd_user_without_a_directory_and_the_fix(box):
    """vpasswd's 6th field may be empty (vpopmail makes the directory at the
    next delivery; qrelay bounces with #5.9.8): one finding naming the user,
    not an empty path, and a fix that works once the field is filled in."""
    domain = box / "domains" / "example.org"
    vpasswd = domain / "vpasswd"
    joe = user_dir(box, "joe@example.org")
    good = vpasswd.read_text()
    vpasswd.write_text(good.replace(f":{joe}:", "::"))
    run_fix(f"qrelay domain mkpasswd {box} example.org")
    (f,) = findings(doctor(box)[1], "perms")
    assert f["what"] == f"{domain}/vpasswd gives user joe no directory"
    assert "#5.9.8" in f["why"]
    edit, rest = f["fix"].split(" && ", 1)
    assert edit == f"${{EDITOR:-vi}} {vpasswd} (6th field: {domain}/joe)"
    vpasswd.write_text(good.replace(f":{joe}:", f":{domain}/joe:"))     # the operator's edit
    run_fix(rest)
    assert findings(doctor(box)[1], "perms") == []


@pytest.mark.skipif(os.getuid() != 0, reason="the receivers run as the caller when not root")
def test_a_domain_the_receivers_cannot_read_and_the_fix(box, monkeypatch):
    from types import SimpleNamespace
    users = {"qrelay": (4343, 4344), "vpopmail": (UID, GID)}
    monkeypatch.setattr("pwd.getpwnam", lambda name: SimpleNamespace(
        pw_name=name, pw_uid=users[name][0], pw_gid=users[name][1]))
    monkeypatch.setattr("pwd.getpwuid", lambda uid: SimpleNamespace(
        pw_name=next(n for n, u in users.items() if u[0] == uid)))
    toml(box, "", run="")               # the default [run] user, qrelay
    _, report = doctor(box)
    (f,) = findings(report, "perms")
    assert f["what"] == (f"the receivers run as qrelay (uid 4343) and cannot read the vpasswd of "
                         f"example.org (uid {UID})")
    assert "451 at RCPT" in f["why"]
    # Every domain is vpopmail's: the receivers should run as vpopmail.
    assert f["fix"] == f'${{EDITOR:-vi}} {box}/qrelay.toml # [run] user = "vpopmail", then restart qrelay run'
    toml(box, "", run='[run]\nuser = "vpopmail"\n')
    assert findings(doctor(box)[1], "perms") == []
    # One of two domains is the run user's: give the other one to it.
    toml(box, "", run="")
    admin.add_domain(box, "mine.example", uid=4343, gid=4344)
    (f,) = findings(doctor(box)[1], "perms")
    assert f["fix"].startswith(f"chown -R 4343:4344 {box}/domains/example.org && sed -i ")
    run_fix(f["fix"])
    assert findings(doctor(box)[1], "perms") == []
    assert os.stat(box / "domains" / "example.org" / "vpasswd").st_uid == 4343


@pytest.mark.skipif(os.getuid() != 0, reason="the receivers run as the caller when not root")
def test_a_domain_with_an_alias_domain_the_receivers_cannot_read_gets_a_command(box, monkeypatch):
    """An alias domain shares its real domain's directory: one domain to give
    to the run user, with both assign lines, not a sentence to act out."""
    from types import SimpleNamespace
    users = {"qrelay": (4343, 4344), "vpopmail": (UID, GID)}
    monkeypatch.setattr("pwd.getpwnam", lambda name: SimpleNamespace(
        pw_name=name, pw_uid=users[name][0], pw_gid=users[name][1]))
    monkeypatch.setattr("pwd.getpwuid", lambda uid: SimpleNamespace(
        pw_name=next(n for n, u in users.items() if u[0] == uid)))
    toml(box, "", run="")
    admin.add_domain(box, "mine.example", uid=4343, gid=4344)
    admin.add_alias(box, "postmaster@mine.example", ["joe@example.org"])
    admin.add_alias_domain(box, "alias.example", "example.org")
    (f,) = findings(doctor(box)[1], "perms")
    assert "alias.example, example.org" in f["what"]
    run_fix(f["fix"])
    assert findings(doctor(box)[1], "perms") == []
    assert os.stat(box / "domains" / "example.org" / "vpasswd").st_uid == 4343
    assign = (box / "users" / "assign").read_text()
    assert "+alias.example-:example.org:4343:4344:" in assign
    assert "+mine.example-:mine.example:4343:4344:" in assign


@pytest.mark.skipif(os.getuid() != 0, reason="changing a file's owner needs root")
def test_wrong_owner_of_maildirs_is_one_line_per_domain_past_the_limit(box):
    ann = user_dir(box, "ann@example.org")
    os.chown(ann / "Maildir" / "cur", 4343, 4343)
    _, report = doctor(box)
    (f,) = findings(report, "perms")
    assert f["what"] == f"{ann}/Maildir/cur is owned by 4343:4343, users/assign says {UID}:{GID}"
    assert f["fix"] == f"chown -R {UID}:{GID} {ann}/Maildir/cur"
    for sub in ("", "new", "tmp"):
        os.chown(ann / "Maildir" / sub, 4343, 4343)
    toml(box, "[doctor]\nmax_findings_per_kind = 2\ndisk_min_free_bytes = 0\n"
         "disk_min_free_percent = 0.0\n")
    _, report = doctor(box)
    (f,) = findings(report, "perms")
    assert "and 3 more like it" in f["what"]
    run_fix(f["fix"])
    assert doctor(box)[0] == 0


@pytest.mark.skipif(os.getuid() != 0, reason="changing a file's owner needs root")
def test_a_dot_qmail_root_made_is_no_finding_one_another_user_owns_is(box):
    """qmail's INSTALL.alias: `touch ~alias/.qmail-postmaster` as root. Root
    owning a .qmail file changes nothing; another user owning it does."""
    domain = box / "domains" / "example.org"
    made = domain / ".qmail-abuse"
    made.write_text("&joe@example.org\n")
    os.chown(made, 0, 0)
    assert findings(doctor(box)[1], "perms") == []
    os.chown(made, 4343, 4343)
    (f,) = findings(doctor(box)[1], "perms")
    assert f["what"] == f"{made} is owned by uid 4343, users/assign says {UID}"


def _queue(root: Path, deferred: int, todo: int, domain: str = "slow.test") -> None:
    spool = Spool(root / "queue")
    try:
        now = time.time()
        ids = [spool.enqueue(Envelope("a@src.test", (f"u{i}@{domain}",)), b"Subject: x\r\n\r\nx\r\n")
               for i in range(deferred + todo)]
        spool.preprocess_many([(m, ["remote"]) for m in ids[:deferred]], now=now)
        spool.apply([Deferred(m, 0, now + 600, "Connection refused (#4.4.1)\n")
                     for m in ids[:deferred]])
    finally:
        spool.close()


def test_queue_health_deferred_per_destination_and_not_preprocessed(box):
    _queue(box, deferred=5, todo=2)
    toml(box, "[doctor]\ndeferred_warn = 3\ntodo_max_age = 0.0\ndisk_min_free_bytes = 0\n"
         "disk_min_free_percent = 0.0\n")
    rc, report = doctor(box)
    assert rc == 1
    summary = notes(report, "queue")[0]
    assert (summary["messages"], summary["not_preprocessed"], summary["deferred"]) == (7, 2, 5)
    dest = notes(report, "queue")[1]
    assert (dest["domain"], dest["deferred"]) == ("slow.test", 5)
    assert dest["last_error"] == "Connection refused (#4.4.1)\n"
    got = {f["what"]: f for f in findings(report, "queue")}
    slow = got["5 recipients deferred for slow.test (Connection refused (#4.4.1))"]
    assert slow["fix"] == f"qrelay doctor {box} slow.test"
    assert "7 messages are queued and no qrelay run holds this root" in got
    assert any(w.startswith("2 messages not yet preprocessed") for w in got)
    with Spool(box / "queue") as spool:
        spool.hold([1])
    _, report = doctor(box)
    assert notes(report, "queue")[0]["held"] == 1


def test_a_spool_index_near_its_map_size_is_a_finding(box):
    """A full index map refuses every message with 451; doctor said nothing
    of it. The way out it names (a larger map) makes room again."""
    from engine.config.settings import SpoolSettings
    from engine.queue import SpoolWriteError
    small = SpoolSettings(index_map_bytes=512 * 1024)
    with Spool(box / "queue", small) as spool:
        with pytest.raises(SpoolWriteError, match="index is full"):
            while True:
                spool._write_batch([(Envelope("a@src.test", ("u@slow.test",)), b"x" * 100)] * 50)
    base = "[doctor]\ndisk_min_free_bytes = 0\ndisk_min_free_percent = 0.0\n"
    toml(box, base + "[spool]\nindex_map_bytes = 524288\n")
    _, report = doctor(box)
    (f,) = [f for f in findings(report, "queue") if "index" in f["what"]]
    assert f["what"].startswith("the spool index holds ") and "of its 512.0 KiB map" in f["what"]
    assert "451" in f["why"] and "[spool] index_map_bytes" in f["fix"]
    toml(box, base + "[spool]\nindex_map_bytes = 16777216\n")
    _, report = doctor(box)
    assert not [f for f in findings(report, "queue") if "index" in f["what"]]
    with Spool(box / "queue", SpoolSettings(index_map_bytes=16777216)) as spool:
        spool.enqueue(Envelope("a@src.test", ("u@slow.test",)), b"room again")


def test_a_remote_reply_or_domain_cannot_put_control_characters_on_the_terminal(box):
    """The last error is a remote server's text, the domain a sender's: their
    controls (ESC, BEL, backspace, a C1 CSI) print as `_`, so doctor's output
    on a terminal runs no escape sequence and each finding stays one line."""
    _queue(box, deferred=1, todo=0, domain="evil\x1bc.test")
    with Spool(box / "queue") as spool:
        spool.apply([Deferred(1, 0, time.time() + 600, "550 \x1b[2J\x07gone\x08\x9b31m ok\r\n")])
    r = CliRunner().invoke(cli, ["doctor", str(box)], env={"QRELAY_ROOT": ""})
    line = next(ln for ln in r.output.splitlines() if ln.startswith("ok: queue: deferred:"))
    assert line == "ok: queue: deferred: evil_c.test: 1 recipients, last error: 550 _[2J_gone__31m ok"
    assert all(c.isprintable() for c in r.output.replace("\n", ""))


def test_no_log_directory_yet_is_no_finding(box):
    """A qmail home turned qrelay root has no log/ until `qrelay run`
    makes it (and gives it to [run] user): nothing to fix before then."""
    import shutil
    shutil.rmtree(box / "log")
    rc, report = doctor(box)
    assert rc == 0 and findings(report, "logs") == []
    assert notes(report, "logs")[0]["text"] == f"{box / 'log'} does not exist yet: qrelay run creates it"


def test_logs_not_rotating_and_not_pruned(box):
    toml(box, "[log]\nmax_bytes = 4096\nmax_files = 3\n[doctor]\ndisk_min_free_bytes = 0\n"
         "disk_min_free_percent = 0.0\n")
    (box / "log" / "current").write_text("x" * 10000)
    for i in range(4):
        (box / "log" / f"@40000000000000{i:02d}00000000.s").write_text("old\n")
    _, report = doctor(box)
    got = findings(report, "logs")
    assert any("over twice [log] max_bytes (4096)" in f["what"] for f in got)
    pruned = next(f for f in got if "rotated files" in f["what"])
    run_fix(f"cd {box} && " + pruned["fix"])
    _, report = doctor(box)
    assert not any("rotated files" in f["what"] for f in findings(report, "logs"))


def test_pruning_rotated_logs_of_a_root_with_a_space_removes_only_them(tmp_path):
    """The prune fix runs through xargs: a root with a space in its name must
    not become two words, `rm` of a file beside the root (here `q`)."""
    from engine.home import init_home
    root = init_home(tmp_path / "q root", me=ME)
    toml(root, "[log]\nmax_files = 3\n[doctor]\ndisk_min_free_bytes = 0\n"
         "disk_min_free_percent = 0.0\n")
    bystander = tmp_path / "q"
    bystander.write_text("not a log\n")
    (root / "log" / "current").write_text("x\n")
    rotated = [f"@40000000000000{i:02d}00000000.s" for i in range(4)]
    for name in rotated:
        (root / "log" / name).write_text("old\n")
    pruned = next(f for f in findings(doctor(root)[1], "logs") if "rotated files" in f["what"])
    run_fix(pruned["fix"])
    assert bystander.read_text() == "not a log\n"
    assert sorted(n for n in os.listdir(root / "log") if n.startswith("@")) == rotated[2:]
    assert not any("rotated files" in f["what"] for f in findings(doctor(root)[1], "logs"))


def test_disk_space_below_the_setting(box):
    toml(box, "[doctor]\ndisk_min_free_percent = 100.0\n")
    _, report = doctor(box)
    f = findings(report, "disk")[0]
    assert "451" in f["why"] and f["what"].startswith("only ")
    assert notes(report, "disk")[0]["free_bytes"] > 0
    # Below the receivers' floor: they refuse MAIL now, and doctor says so.
    toml(box, "[spool]\nmin_free_bytes = 1125899906842624\n")
    (f,) = findings(doctor(box)[1], "disk")
    assert "below [spool] min_free_bytes (1024.0 TiB)" in f["what"] and "452" in f["why"]


def test_open_smtp_size_and_an_entry_clearopensmtp_should_have_removed(box):
    etc = box / "etc"
    etc.mkdir()
    now = int(time.time())
    (etc / "open-smtp").write_text(f'192.0.2.9:allow,RELAYCLIENT="",RBLSMTPD=""\t{now - 86400}\n'
                                   f'192.0.2.2:allow,RELAYCLIENT="",RBLSMTPD=""\t{now}\n'
                                   f'192.0.2.3:allow,RELAYCLIENT="",RBLSMTPD=""\t{"9" * 5000}\n')
    # vchkpw's tcp.smtp.cdb: the static rules, then each open-smtp line's rule
    with open(box / "control" / "tcp.smtp", "a") as f:
        f.write('192.0.2.9:allow,RELAYCLIENT="",RBLSMTPD=""\n')
    _, report = doctor(box)
    note = next(n for n in notes(report, "relay") if "open-smtp" in n["text"])
    assert note["entries"] == 2 and note["oldest"] == now - 86400
    (f,) = findings(report, "relay")
    assert "clearopensmtp" in f["why"] and "1 d" in f["what"]


def test_open_smtp_left_over_from_vpopmail_is_no_finding(box):
    """qrelay reads control/tcp.smtp, not open-smtp: an old line whose IP
    has no rule there lets nobody relay (the README says to drop the
    clearopensmtp cron line after `qrelay relayclients import`)."""
    etc = box / "etc"
    etc.mkdir()
    now = int(time.time())
    (etc / "open-smtp").write_text(f'192.0.2.9:allow,RELAYCLIENT="",RBLSMTPD=""\t{now - 86400}\n')
    rc, report = doctor(box)
    assert rc == 0 and findings(report, "relay") == []
    assert any("qrelay does not read it" in n["text"] for n in notes(report, "relay"))


# ---------------------------------------------------------------- DOMAIN

def _delivery(root: Path, dns, port: int, extra: str = "") -> None:
    toml(root, f'[delivery]\ndns_servers = ["{dns.address}"]\nmx_port = {port}\ndns_timeout = 1.0\n'
               f"[doctor]\nconnect_timeout = 2.0\n{extra}")


def test_domain_mx_records_and_a_connect_greeting_ehlo_to_each(box, dns, sinks):
    sink = sinks()
    dns.zone["far.test"] = {"MX": [(10, "mx1.far.test"), (20, "mx2.far.test")]}
    dns.zone["mx1.far.test"] = {"A": ["127.0.0.1"]}
    dns.zone["mx2.far.test"] = {"A": ["127.0.0.3"]}     # nothing listens there
    _delivery(box, dns, sink.port)
    rc, report = doctor(box, "far.test")
    assert rc == 1
    texts = [n["text"] for n in notes(report, "network")]
    assert any(t.startswith("MX 10 mx1.far.test") for t in texts)
    assert any(t.startswith("MX 20 mx2.far.test") for t in texts)
    ok = next(n for n in notes(report, "network") if n.get("ip") == "127.0.0.1")
    assert ok["greeting"].startswith("220 ") and "PIPELINING" in ok["extensions"]
    (refused,) = findings(report, "network")
    assert refused["what"].startswith(f"connect to 127.0.0.3 port {sink.port} (mx2.far.test")
    assert "next address" in refused["why"]
    assert ("far.test", "MX") in dns.queries
    assert sink.stats().get("messages", 0) == 0        # nothing was sent


def test_domain_ipv6_mx_unreachable_gets_a_netcat_line_that_runs(box, dns, sinks):
    sink = sinks()                                      # on 127.0.0.1: ::1 refuses
    dns.zone["far6.test"] = {"MX": [(10, "mx.far6.test")]}
    dns.zone["mx.far6.test"] = {"AAAA": ["::1"]}
    _delivery(box, dns, sink.port)
    _, report = doctor(box, "far6.test")
    refused = next(f for f in findings(report, "network") if f["what"].startswith("connect to"))
    assert refused["what"].startswith(f"connect to ::1 port {sink.port} (mx.far6.test")
    # nc takes the address and the port apart: a bracketed [::1] is no host to it.
    assert refused["fix"].startswith(f"nc -v ::1 {sink.port} ")


def test_domain_that_does_not_exist_and_a_busy_smtproutes_relay(box, dns, sinks):
    busy = sinks("--greet-fail", "100")
    _delivery(box, dns, busy.port)
    (box / "control" / "smtproutes").write_text(f"busy.test:127.0.0.1:{busy.port}\n")
    rc, report = doctor(box, "nowhere.test")
    (f,) = findings(report, "network")
    assert "couldn't find any host named nowhere.test" in f["what"] and f["why"] == "its mail bounces"
    # The fix asks the server delivery asks, on its port: not port 53 of its host.
    host, port = dns.address.rsplit(":", 1)
    assert f["fix"] == f"dig mx nowhere.test @{host} -p {port}"
    rc, report = doctor(box, "busy.test")
    assert any("smtproutes: busy.test goes to 127.0.0.1" in n["text"] for n in notes(report, "network"))
    got = findings(report, "network")
    assert any("greets with 421" in f["what"] for f in got)
    assert any("no address of busy.test accepted" in f["what"] for f in got)


def test_domain_tcpto_and_its_deferred_mail(box, dns, sinks):
    sink = sinks()
    dns.zone["slow.test"] = {"A": ["127.0.0.1"]}
    _delivery(box, dns, sink.port)
    _queue(box, deferred=3, todo=0)
    (box / "queue" / "lock").mkdir(exist_ok=True)
    record = bytes([127, 0, 0, 1, 2, 0, 0, 0]) + struct.pack("<I", int(time.time()) - 60) + bytes(4)
    (box / "queue" / "lock" / "tcpto").write_bytes(record + bytes(16 * 63))
    _, report = doctor(box, "slow.test")
    (f,) = findings(report, "network")
    assert f["what"].startswith("tcpto: 127.0.0.1 timed out") and "recent timeouts: 2" in f["what"]
    queued = next(n for n in notes(report, "network") if "deferred" in n)
    assert queued["deferred"] == 3 and "Connection refused" in queued["last_error"]


# ---------------------------------------------------------------- ADDRESS

def test_address_routes_locally_through_assign_qmail_default_and_vpasswd(box):
    rc, report = doctor(box, "joe@example.org")
    assert rc == 0, findings(report)
    got = notes(report, "route")
    assert got[0]["text"] == "qmail-send rewrites joe@example.org to example.org-joe@example.org"
    assert (got[1]["uid"], got[1]["home"], got[1]["ext"]) == (UID, str(box / "domains" / "example.org"), "joe")
    assert got[2]["qmail"] == str(box / "domains" / "example.org" / ".qmail-default")
    joe = user_dir(box, "joe@example.org")
    assert got[3]["maildir"] == f"{joe}/Maildir/"
    _, report = doctor(box, "info@example.org")
    assert any(n.get("kind") == "forward" and n["target"] == "joe@example.org"
               for n in notes(report, "route"))
    rc, report = doctor(box, "nobody@example.org")
    (f,) = findings(report, "route")
    assert rc == 1 and "bounce-no-mailbox" in f["what"]


def test_address_whose_dot_qmail_is_empty_gets_the_default_delivery(box):
    """qmail's INSTALL.alias makes empty ~alias/.qmail-postmaster files: an
    empty .qmail means the default delivery, which doctor checks instead."""
    domain = box / "domains" / "example.org"
    (domain / ".qmail-abuse").write_text("")
    rc, report = doctor(box, "abuse@example.org")
    got = notes(report, "route")
    assert got[3]["text"] == ("it is empty: the default delivery (control/defaultdelivery, "
                              "else ./Maildir/)")
    assert (got[4]["kind"], got[4]["target"]) == ("maildir", str(domain / "Maildir"))
    (f,) = findings(report, "route")          # the domain directory has no Maildir/
    assert rc == 1 and f["what"] == f"{domain / 'Maildir'} is not a Maildir (no new/)"
    (box / "control" / "defaultdelivery").write_text("&joe@example.org\n")
    rc, report = doctor(box, "abuse@example.org")
    assert rc == 0 and notes(report, "route")[4]["target"] == "joe@example.org"


def test_address_routes_remotely_in_order_without_sending(box, dns, sinks):
    sink = sinks()
    dns.zone["far.test"] = {"MX": [(20, "b.far.test"), (10, "a.far.test")]}
    dns.zone["a.far.test"] = {"A": ["127.0.0.1"]}
    dns.zone["b.far.test"] = {"A": ["127.0.0.2"]}
    _delivery(box, dns, sink.port)
    rc, report = doctor(box, "bob@far.test")
    assert rc == 0
    (n,) = notes(report, "route")
    assert [h["ip"] for h in n["hosts"]] == ["127.0.0.1", "127.0.0.2"]
    assert n["port"] == sink.port and n["channel"] == "remote"
    assert sink.stats().get("connections", 0) == 0


# ---------------------------------------------------------------- input

def test_bad_input_is_one_line_and_exit_2(tmp_path, box):
    for args in (["doctor", str(tmp_path / "missing")], ["doctor", str(tmp_path)],
                 ["doctor", str(box), "a b@c.test"], ["doctor", str(box), "@x.test"],
                 ["doctor", str(box), "exa$mple.org"]):
        r = run_cli(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_root_alone_and_from_the_environment(box):
    r = CliRunner().invoke(cli, ["doctor", str(box)], env={"QRELAY_ROOT": ""})
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["doctor", "joe@example.org", "--json"],
                           env={"QRELAY_ROOT": str(box)})
    assert r.exit_code == 0 and json.loads(r.output)["target"] == "joe@example.org"


def test_relay_table_size_and_first_expiry(box):
    import asyncio
    from engine.config.settings import load_settings
    from engine.relay import open_relay_table
    _, report = doctor(box)
    assert any("relay table is empty" in n["text"] for n in notes(report, "relay"))

    async def grant() -> None:
        table = open_relay_table(box, load_settings(box))
        try:
            await table.grant("192.0.2.7")
            await table.grant("192.0.2.8", ttl=60)
        finally:
            await table.close()
    asyncio.run(grant())
    _, report = doctor(box)
    note = next(n for n in notes(report, "relay") if "clients may relay" in n["text"])
    assert note["entries"] == 2 and note["first_expiry"] <= time.time() + 60
    assert findings(report, "relay") == []


def test_tcp_smtp_that_lets_anyone_relay(box):
    (box / "control" / "tcp.smtp").write_text('127.:allow,RELAYCLIENT=""\n:allow,RELAYCLIENT=""\n')
    _, report = doctor(box)
    (f,) = findings(report, "relay")
    assert "open relay" in f["why"] and f["fix"].endswith(f"qrelay tcprules {box}")
    (box / "control" / "tcp.smtp").write_text('127.:allow,RELAYCLIENT=""\n:allow\n')
    assert findings(doctor(box)[1], "relay") == []


def test_a_vpopmail_domain_that_lost_its_virtualdomains_line_gets_a_fix_that_works(box):
    # rcpthosts and users/assign have example.org; virtualdomains lost it (a hand edit):
    # `qrelay domain add` refuses (the domain exists), so it must not be the fix.
    vd = box / "control" / "virtualdomains"
    vd.write_text("".join(line + "\n" for line in vd.read_text().splitlines()
                          if not line.startswith("example.org:")))
    _, report = doctor(box)
    (f,) = [f for f in findings(report, "domains") if "example.org" in f["what"]]
    run_fix(f["fix"])
    assert findings(doctor(box)[1], "domains") == []


def test_virtual_but_unassigned_and_not_accepted_gets_a_fix_that_works(box):
    # virtualdomains has a line for a domain users/assign and rcpthosts do not know.
    with open(box / "control" / "virtualdomains", "a") as f:
        f.write("lost.test:lost.test\n")
    _, report = doctor(box)
    got = [f for f in findings(report, "domains") if "lost.test" in f["what"]]
    assert any("no +lost.test- line" in f["what"] for f in got), got
    for f in got:
        run_fix(f["fix"])
    left = [f["what"] for f in findings(doctor(box)[1], "domains") if "lost.test" in f["what"]]
    assert left == ["postmaster@lost.test has no mailbox, alias or catch-all"], left


def test_an_assign_line_added_by_the_fix_under_a_root_with_a_quote(odd_box):
    """The users/assign line the fix inserts holds the root's path: the sed
    script is one quoted word, whatever the path holds."""
    box = odd_box
    admin.add_domain(box, "example.net", uid=UID, gid=GID)
    admin.add_alias(box, "postmaster@example.net", ["joe@example.org"])
    assign = box / "users" / "assign"
    assign.write_text("".join(line for line in assign.read_text().splitlines(True)
                              if not line.startswith("+example.net-")))
    admin.newu(box)
    (f,) = findings(doctor(box)[1], "domains")
    assert "users/assign has no +example.net- line" in f["what"]
    run_fix(f["fix"])
    assert findings(doctor(box)[1]) == []
    assert f"+example.net-:example.net:{UID}:{GID}:{box}/domains/example.net:-::\n.\n" in \
        assign.read_text()


def test_virtualdomains_address_and_wildcard_keys_get_fixes_for_their_own_lines(box):
    # v.test reaches example.org's mailboxes; two more keys under it have no
    # assign line: a whole-address key and a `.sub` wildcard. Their fixes must
    # touch their own lines: not `v.test:example.org` (which `/^v\.test:/`
    # deletes), and not make v.test a new vpopmail domain of its own.
    vd = box / "control" / "virtualdomains"
    with open(vd, "a") as f:
        f.write("v.test:example.org\njoe@v.test:special\n.v.test:subs\n")
    _, report = doctor(box)
    got = [f for f in findings(report, "domains") if "users/assign has no" in f["what"]
           and ("+special-" in f["what"] or "+subs-" in f["what"])]
    assert len(got) == 2, findings(report, "domains")
    for f in got:
        run_fix(f["fix"])
    lines = vd.read_text().splitlines()
    assert "v.test:example.org" in lines
    assert "joe@v.test:special" not in lines and ".v.test:subs" not in lines
    assert not (box / "domains" / "v.test").exists()
    wildcard = [f for f in findings(report, "domains") if f["what"].startswith(".v.test ")]
    assert wildcard and wildcard[0]["fix"].endswith(f"echo .v.test >> {box}/control/rcpthosts")


def test_a_missing_maildir_is_fixed_by_one_run_of_its_fix(box):
    import shutil
    joe = user_dir(box, "joe@example.org")
    shutil.rmtree(joe / "Maildir")
    (f,) = findings(doctor(box)[1], "perms")
    assert f["what"] == f"{joe}/Maildir does not exist"
    run_fix(f["fix"])
    assert findings(doctor(box)[1], "perms") == []
    if os.getuid() == 0:
        assert os.stat(joe / "Maildir" / "cur").st_uid == UID


def test_a_vpopmail_domain_whose_directory_is_gone_is_made_again_not_left_empty(box):
    """An empty directory in its place has no .qmail-default: every message
    for the domain would bounce (no mailbox here by that name) where it
    deferred, and doctor would see nothing. The fix makes the domain as
    `domain add` does, and doctor then names what is left to do."""
    import shutil
    admin.add_alias_domain(box, "alias.example", "example.org")
    domain = box / "domains" / "example.org"
    shutil.rmtree(domain)
    (f,) = findings(doctor(box)[1], "perms")
    assert f["what"].startswith(f"{domain} (users/assign +example.org-:example.org:")
    assert "mailboxes are gone" in f["why"]
    run_fix(f["fix"])
    _, report = doctor(box)
    assert findings(report, "perms") == []
    assert [x["what"] for x in findings(report)] == [
        "postmaster@example.org has no mailbox, alias or catch-all"]
    (bounce,) = findings(doctor(box, "joe@alias.example")[1], "route")
    assert "bounce-no-mailbox" in bounce["what"]
    for path, mode in ((domain, 0o700), (domain / "vpasswd", 0o600)):
        st = os.stat(path)
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (UID, GID, mode)


def test_alias_domains_left_by_a_removed_real_domain_are_deleted_by_the_fix(box):
    """The real domain taken out by hand (its line, its directory): its alias
    domains still point at the directory. There is no domain to make again
    (`domain mkpasswd` of it says `no such domain`): the fix deletes every
    alias left, and doctor then has nothing to say."""
    import shutil
    for alias in ("alias.example", "alias2.example"):
        admin.add_alias_domain(box, alias, "example.org")
    assign = box / "users" / "assign"
    assign.write_text("".join(line + "\n" for line in assign.read_text().splitlines()
                              if not line.startswith("+example.org-")))
    admin.newu(box)
    for name in ("virtualdomains", "rcpthosts"):
        path = box / "control" / name
        path.write_text("".join(line + "\n" for line in path.read_text().splitlines()
                                if not line.startswith("example.org")))
    shutil.rmtree(box / "domains" / "example.org")
    (f,) = findings(doctor(box)[1], "perms")
    assert f["what"].startswith(f"{box}/domains/example.org (users/assign +alias.example-:")
    assert "example.org, the domain it is an alias of, is gone" in f["why"]
    assert f["fix"] == (f"qrelay domain del {box} alias.example && "
                        f"qrelay domain del {box} alias2.example")
    run_fix(f["fix"])
    assert findings(doctor(box)[1]) == []
    assert assign.read_text() == ".\n"


def test_an_alias_domain_left_behind_by_a_moved_real_domain_follows_it(box, tmp_path):
    """The real domain moved by hand (its directory and its assign line, not
    its alias's): making the old directory again would turn the alias's
    deferrals into bounces. The fix points the alias at the real domain."""
    admin.add_alias_domain(box, "alias.example", "example.org")
    old = box / "domains" / "example.org"
    new = tmp_path / "big" / "example.org"
    new.parent.mkdir()
    old.rename(new)
    assign = box / "users" / "assign"
    assign.write_text(assign.read_text().replace(f"+example.org-:example.org:{UID}:{GID}:{old}:",
                                                 f"+example.org-:example.org:{UID}:{GID}:{new}:"))
    admin.newu(box)
    vpasswd = new / "vpasswd"       # the users' directories too, as a move does
    vpasswd.write_text(vpasswd.read_text().replace(str(old), str(new)))
    admin.rebuild_cdb(box, "example.org")
    (f,) = findings(doctor(box)[1], "perms")
    assert f["what"].startswith(f"{old} (users/assign +alias.example-:")
    assert f"example.org, the domain it is an alias of, is in {new}" in f["why"]
    assert f["fix"] == (f"qrelay domain del {box} alias.example && "
                        f"qrelay domain alias {box} alias.example example.org")
    run_fix(f["fix"])
    assert findings(doctor(box)[1]) == []
    assert f"+alias.example-:example.org:{UID}:{GID}:{new}:-::" in assign.read_text()
    assert not old.exists()


def test_mailboxes_the_fixes_make_are_private_whatever_the_umask(box):
    """qrelay and vpopmail make a user's directory and Maildir 0700: the
    mkdir of a fix must not leave another user's mail readable by all."""
    import shutil
    joe, ann = user_dir(box, "joe@example.org"), user_dir(box, "ann@example.org")
    shutil.rmtree(joe / "Maildir")
    shutil.rmtree(ann)
    old = os.umask(0o022)
    try:
        for f in findings(doctor(box)[1], "perms"):
            run_fix(f["fix"])
        assert findings(doctor(box)[1], "perms") == []
        shutil.rmtree(joe / "Maildir")
        (f,) = findings(doctor(box, "joe@example.org")[1], "route")
        run_fix(f["fix"])
    finally:
        os.umask(old)
    for path in (joe / "Maildir", joe / "Maildir" / "new", ann, ann / "Maildir",
                 ann / "Maildir" / "cur"):
        assert os.stat(path).st_mode & 0o077 == 0, path


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run doctor as another user")
def test_doctor_run_by_a_user_who_cannot_read_the_domains_says_so(box):
    # As nobody: the domain (0700, uid 4242) and the spool/log/relay (the run
    # user's) are closed. Nothing there is wrong; doctor must say what it could
    # not check, not report it broken nor offer a chown to nobody.
    # The relay table as on a box `qrelay run` uses: its files belong to the run user.
    assert run_cli("relayclients", "list", str(box)).returncode == 0
    assert (box / "relay" / "lock.mdb").exists()
    r = subprocess.run([sys.executable, "-m", "engine.cli", "doctor", str(box), "--json"],
                       cwd="/", capture_output=True, text=True, timeout=60,
                       user=65534, group=65534, extra_groups=[],
                       env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO)})
    report = json.loads(r.stdout)
    wrong = [f for f in report["findings"] if f["check"] != "domains"]
    assert wrong == [], wrong
    unchecked = " ".join(n["text"] for n in report["notes"] if "not checked" in n["text"])
    assert f"{box}/domains/example.org" in unchecked and "as root" in unchecked, report["notes"]
    assert f"{box}/log: not checked: uid 65534 may not write it" in unchecked, report["notes"]
    assert f"may not use {box}/relay/lock.mdb" in unchecked, report["notes"]


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run doctor as another user")
def test_doctor_run_by_a_user_who_cannot_read_the_spool_or_certificate_says_so(box):
    # On a box `qrelay run` has used: queue/index is the run user's (0700) and
    # servercert.pem is root:run group 0640, as the README has it. Doctor run
    # by another user reported "queue: the check could not finish
    # (PermissionError ...); fix: qrelay doctor ROOT" (the same command again)
    # and "tls: ... Permission denied: qrelay run refuses to start with a TLS
    # listener", both false: the receivers read them fine.
    from engine.privilege import ensure_system_user
    with Spool(box / "queue") as spool:
        spool.enqueue(Envelope("a@src.test", ("u@far.test",)), b"Subject: x\r\n\r\nx\r\n")
    for path in (box / "queue" / "index", *(box / "queue" / "index").iterdir()):
        os.chown(path, UID, GID)
    (box / "queue" / "index").chmod(0o700)
    _certificate(box, ME, days=90)
    cert = box / "control" / "servercert.pem"
    os.chown(cert, 0, ensure_system_user().gid)   # [run] user's group: the receivers read it
    cert.chmod(0o640)
    r = subprocess.run([sys.executable, "-m", "engine.cli", "doctor", str(box), "--json"],
                       cwd="/", capture_output=True, text=True, timeout=60,
                       user=65534, group=65534, extra_groups=[],
                       env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO)})
    report = json.loads(r.stdout)
    wrong = [f for f in report["findings"] if f["check"] in ("queue", "tls")]
    assert wrong == [], wrong
    unchecked = " ".join(n["text"] for n in report["notes"] if "not checked" in n["text"])
    assert f"{box}/queue/index: not checked: uid 65534 may not read it" in unchecked, \
        report["notes"]
    assert f"{cert}: not checked: uid 65534 may not read it" in unchecked, report["notes"]


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run doctor as another user")
def test_doctor_on_a_root_the_user_cannot_reach_says_so_not_that_there_is_none(tmp_path):
    # os.path.isdir() answers False for EACCES too: it said "no such qrelay root".
    from engine.home import init_home
    tmp_path.chmod(0o755)
    (tmp_path / "locked").mkdir(mode=0o700)
    root = init_home(tmp_path / "locked" / "root", me="mx.example.com")
    r = subprocess.run([sys.executable, "-m", "engine.cli", "doctor", str(root)],
                       cwd="/", capture_output=True, text=True, timeout=60,
                       user=65534, group=65534, extra_groups=[],
                       env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO)})
    assert (r.returncode, r.stderr.splitlines()) == (1, [f"Error: {root}: Permission denied"])


def _certificate(root: Path, *names: str, days: float, name: str = "servercert.pem") -> None:
    """A trustme certificate for `names` valid for `days` more (negative: expired)."""
    import datetime

    import trustme
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = trustme.CA().issue_cert(*names, not_before=now - datetime.timedelta(days=400),
                                   not_after=now + datetime.timedelta(days=days))
    cert.private_key_and_cert_chain_pem.write_to_path(str(root / "control" / name))


def test_tls_certificate_validity_names_and_loading(box):
    _, report = doctor(box)
    assert findings(report, "tls") == []
    text = notes(report, "tls")[0]["text"]
    assert "servercert.pem is missing: STARTTLS is not offered" in text
    assert "AUTH only as CRAM-MD5" in text          # EHLO still offers it, as jms1's patch does
    _certificate(box, ME, "smtp.example.com", days=300)
    _, report = doctor(box)
    assert findings(report, "tls") == []
    (note,) = notes(report, "tls")
    assert note["text"].startswith("control/servercert.pem: valid until ")
    assert note["text"].endswith(f"for {ME}, smtp.example.com") and "(299 d 23 h)" in note["text"]
    _certificate(box, "*.example.com", days=3)       # a wildcard covers mx.example.com
    _, report = doctor(box)
    (soon,) = findings(report, "tls")
    assert soon["what"].startswith("control/servercert.pem expires in 2 d 23 h (")
    assert soon["fix"].startswith("cat FULLCHAIN.pem KEY.pem > ")
    assert not [n for n in notes(report, "tls") if "does not name" in n["text"]]
    _certificate(box, "other.example.net", days=-2)
    _, report = doctor(box)
    (expired,) = findings(report, "tls")
    assert expired["what"].startswith("control/servercert.pem expired 2 d ago (")
    assert "mail programs cannot send" in expired["why"]
    (mismatch,) = [n for n in notes(report, "tls") if "does not name" in n["text"]]
    assert mismatch["text"].startswith(f"control/servercert.pem does not name {ME} (control/me)")
    _certificate(box, ME, days=-1, name="clientcert.pem")
    assert [f["what"][:37] for f in findings(doctor(box)[1], "tls")] == [
        "control/servercert.pem expired 2 d ag", "control/clientcert.pem expired 1 d ag"]
    (box / "control" / "servercert.pem").write_text("-----BEGIN CERTIFICATE-----\nxx\n")
    (broken,) = [f for f in findings(doctor(box)[1], "tls") if "servercert" in f["what"]]
    assert broken["what"].startswith("control/servercert.pem: cannot load the certificate")
    assert "qrelay run refuses to start" in broken["why"]


@pytest.mark.skipif(os.getuid() != 0, reason="the receivers run as the caller when not root")
def test_a_certificate_the_receivers_cannot_read_and_the_fix(box):
    _certificate(box, ME, days=300)
    cert = box / "control" / "servercert.pem"
    cert.chmod(0o600)
    toml(box, "", run='[run]\nuser = "nobody"\n')
    (f,) = findings(doctor(box)[1], "tls")
    assert f["what"] == f"[run] user nobody cannot read {cert}"
    run_fix(f["fix"])
    assert findings(doctor(box)[1], "tls") == []


@pytest.mark.skipif(os.getuid() != 0, reason="the receivers run as the caller when not root")
def test_the_certificate_fix_under_a_root_with_a_space_and_a_quote(odd_box):
    box = odd_box
    _certificate(box, ME, days=300)
    cert = box / "control" / "servercert.pem"
    cert.chmod(0o600)
    toml(box, "", run='[run]\nuser = "nobody"\n')
    (f,) = findings(doctor(box)[1], "tls")
    run_fix(f["fix"])
    assert findings(doctor(box)[1], "tls") == []


def test_the_clearopensmtp_fix_under_a_root_with_a_space_and_a_quote(odd_box, tmp_path):
    """Run now and from cron: the script's path is quoted on the command line
    and again inside the crontab line (crontab is a stand-in here)."""
    box = odd_box
    (box / "etc").mkdir()
    (box / "bin").mkdir()
    (box / "etc" / "open-smtp").write_text(
        f'192.0.2.9:allow,RELAYCLIENT="",RBLSMTPD=""\t{int(time.time()) - 86400}\n')
    with open(box / "control" / "tcp.smtp", "a") as f:
        f.write('192.0.2.9:allow,RELAYCLIENT="",RBLSMTPD=""\n')
    clear = box / "bin" / "clearopensmtp"
    ran = tmp_path / "ran"
    clear.write_text(f"#!/bin/sh\n: > \"$(dirname \"$0\")/../etc/open-smtp\"\necho >> {ran}\n")
    clear.chmod(0o755)
    (f,) = findings(doctor(box)[1], "relay")
    crontab = tmp_path / "crontab"
    run_fix(f'crontab() {{ if [ "$1" = -l ]; then cat {crontab} 2>/dev/null; '
            f'else cat > {crontab}; fi; }}\n' + f["fix"])
    assert findings(doctor(box)[1], "relay") == []
    (job,) = crontab.read_text().splitlines()
    assert job.startswith("*/30 * * * * ")
    subprocess.run(["/bin/sh", "-c", job.split(" ", 5)[5]], check=True)     # as cron runs it
    assert ran.read_text() == "\n\n"
