"""`qrelay` as a shell user meets it (issue #15 item 6): ROOT may be left out
($QRELAY_ROOT, else /var/qrelay), positional ROOT keeps working, and every
command's --help says what it reads and writes."""
from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from engine.cli import DEFAULT_ROOT, cli


def invoke(args: list[str], root_env: str | None = None, stdin: str | None = None):
    env = {"QRELAY_ROOT": root_env} if root_env is not None else {"QRELAY_ROOT": ""}
    return CliRunner().invoke(cli, args, env=env, input=stdin, catch_exceptions=False)


def commands(group: click.Group = cli, prefix: tuple[str, ...] = ()):
    for name, cmd in sorted(group.commands.items()):
        if isinstance(cmd, click.Group):
            yield from commands(cmd, prefix + (name,))
        else:
            yield prefix + (name,), cmd


def takes_root(cmd: click.Command) -> bool:
    return any(isinstance(p, click.Argument) and p.name == "root" for p in cmd.params)


ROOT_COMMANDS = [path for path, cmd in commands() if takes_root(cmd)]


def test_every_root_command_is_covered():
    # The commands of issue #15's list; a new one with a ROOT joins the checks below.
    names = {" ".join(p) for p in ROOT_COMMANDS}
    assert {"init", "run", "qstat", "qread", "flush", "newmrh", "tcprules", "newu",
            "domain add", "user add", "alias add"} <= names


@pytest.mark.parametrize("path", ROOT_COMMANDS, ids=" ".join)
def test_root_is_optional_and_the_help_says_what_is_read_and_written(path):
    r = invoke([*path, "--help"])
    assert r.exit_code == 0
    usage = r.output.splitlines()[0]
    assert "[ROOT]" in usage, usage
    assert f"ROOT defaults to $QRELAY_ROOT, else {DEFAULT_ROOT}" in r.output
    assert "Reads" in r.output or "Writes" in r.output or "writes" in r.output or \
        "Removes" in r.output or "Remove" in r.output, r.output
    assert "scheduler.pid" not in r.output      # stale: the lock names the running instance


def test_run_help_names_the_signals_and_the_logs():
    text = invoke(["run", "--help"]).output
    for word in ("TERM", "INT", "HUP", "ALRM", "ROOT/log/current", "ROOT/log/smtpd/current",
                 "queue/lock/sendmutex"):
        assert word in text, word


def test_root_from_the_environment_and_positional_root_both_work(root: Path, tmp_path):
    # No ROOT: $QRELAY_ROOT.
    r = invoke(["qstat"], root_env=str(root))
    assert r.exit_code == 0, r.output
    assert "messages in queue: 0" in r.output
    # Positional ROOT wins over the environment.
    r = invoke(["qstat", str(root)], root_env=str(tmp_path / "elsewhere"))
    assert r.exit_code == 0, r.output


def test_default_root_is_var_qrelay_when_the_environment_has_none():
    if Path(DEFAULT_ROOT).exists():
        pytest.skip(f"{DEFAULT_ROOT} exists on this machine")
    r = CliRunner().invoke(cli, ["qstat"], env={"QRELAY_ROOT": None})
    assert r.exit_code != 0
    assert DEFAULT_ROOT in r.output and "Missing argument" not in r.output


def test_accounts_commands_with_and_without_root(root: Path):
    env = str(root)
    r = invoke(["domain", "add", "example.com", "--uid", "12345", "--gid", "12345"], root_env=env)
    assert r.exit_code == 0, r.output
    r = invoke(["domain", "add", str(root), "example.net", "--uid", "12345", "--gid", "12345"],
               root_env="/nonexistent")
    assert r.exit_code == 0, r.output
    r = invoke(["user", "add", "joe@example.com"], root_env=env, stdin="secret\n")
    assert r.exit_code == 0, r.output
    r = invoke(["alias", "add", "sales@example.com", "joe@example.com", "ann@example.net"],
               root_env=env)
    assert r.exit_code == 0, r.output
    r = invoke(["alias", "add", str(root), "info@example.com", "joe@example.com"],
               root_env="/nonexistent")
    assert r.exit_code == 0, r.output
    assert (root / "domains" / "example.com" / ".qmail-sales").read_text().splitlines() == [
        "&joe@example.com", "&ann@example.net"]
    assert (root / "domains" / "example.com" / ".qmail-info").exists()
    r = invoke(["user", "list", "example.com"], root_env=env)
    assert r.exit_code == 0 and r.output.startswith("joe@example.com\t"), r.output
    r = invoke(["domain", "list"], root_env=env)
    assert [x.split("\t")[0] for x in r.output.splitlines()] == ["example.com", "example.net"]
    # A missing argument is still named as such.
    r = invoke(["domain", "add"], root_env=env)
    assert r.exit_code == 2 and "Missing argument 'DOMAIN'" in r.output


@pytest.mark.parametrize("path", ROOT_COMMANDS, ids=" ".join)
def test_an_unknown_option_is_one_line_and_exit_2(path, root: Path):
    r = CliRunner().invoke(cli, [*path, str(root), "--no-such-option"], env={"QRELAY_ROOT": ""})
    assert r.exit_code == 2, r.output
    assert r.stderr.splitlines() == [f"Error: No such option '--no-such-option' "
                                     f"(see: cli {' '.join(path)} --help)"], r.stderr


@pytest.mark.parametrize("args,line", [
    (["nosuch"], "Error: No such command 'nosuch' (see: cli --help)"),
    (["domain", "nosuch"], "Error: No such command 'nosuch' (see: cli domain --help)"),
    (["domain", "add"], "Error: Missing argument 'DOMAIN' (see: cli domain add --help)"),
    (["run", "--listen", "bogus"],
     "Error: --listen 'bogus': expected [SCHEME://]HOST:PORT (see: cli run --help)"),
])
def test_usage_errors_are_one_line(args, line, root: Path):
    r = CliRunner().invoke(cli, args, env={"QRELAY_ROOT": str(root)})
    assert (r.exit_code, r.stderr.splitlines()) == (2, [line])


@pytest.mark.parametrize("args", [[], ["domain"], ["relayclients"]])
def test_a_group_alone_shows_its_help_not_an_error_made_of_it(args, root: Path):
    # `qrelay` alone is click's help (on stderr, exit 2), not "Error: Usage: ..."
    # with "(see: qrelay --help)" glued to the last command's line.
    r = CliRunner().invoke(cli, args, env={"QRELAY_ROOT": str(root)})
    if args == ["relayclients"]:
        assert r.exit_code == 0         # `relayclients` alone lists the table
        return
    assert r.exit_code == 2
    assert r.stderr.startswith(f"Usage: cli {' '.join(args)}".rstrip() + " [OPTIONS] COMMAND")
    assert "Error" not in r.stderr and "(see:" not in r.stderr, r.stderr


@pytest.mark.parametrize("args", [
    ["init", ""], ["qstat", ""], ["flush", ""], ["newu", ""], ["doctor", "", "example.com"],
    ["domain", "add", "", "example.com", "--uid", "89", "--gid", "89"],
    ["relayclients", "add", "", "192.0.2.1"]], ids=lambda a: " ".join(a[:2]))
def test_an_empty_root_is_refused_not_taken_for_the_current_directory(args, root: Path,
                                                                        monkeypatch):
    # `qrelay domain add "$ROOT" example.com` with $ROOT unset: an empty word
    # is no ROOT; it worked on whatever directory the shell was in.
    monkeypatch.chdir(root)
    before = sorted(p.name for p in root.rglob("*"))
    r = CliRunner().invoke(cli, args, env={"QRELAY_ROOT": ""})
    assert (r.exit_code, len(r.stderr.splitlines())) == (2, 1), r.output
    assert "ROOT" in r.stderr and "empty" in r.stderr, r.stderr
    assert sorted(p.name for p in root.rglob("*")) == before


@pytest.mark.skipif(__import__("os").geteuid() != 0, reason="needs root to switch users")
@pytest.mark.parametrize("command", [["qstat"], ["qread"], ["qshape"], ["flush"],
                                     ["why", "{root}", "1"], ["hold", "{root}", "1"]])
def test_queue_commands_as_a_user_who_cannot_read_the_spool_say_so_in_one_line(tmp_path, command):
    import os
    import subprocess
    import sys

    from tests.conftest import REPO
    tmp_path.chmod(0o755)
    root = tmp_path / "root"
    qrelay = [sys.executable, "-m", "engine.cli"]
    subprocess.run(qrelay + ["init", str(root), "--me", "mx.test"], cwd=REPO, check=True,
                   capture_output=True)
    subprocess.run(qrelay + ["inject", str(root), "a@far.test"], input=b"Subject: x\n\nhi\n",
                   cwd=REPO, check=True, capture_output=True)
    words = [w.format(root=root) for w in command] + ([] if len(command) > 1 else [str(root)])
    r = subprocess.run(qrelay + words, cwd="/", capture_output=True, text=True, timeout=60,
                       user=65534, group=65534, extra_groups=[],
                       env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO)})
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        f"Error: {root}/queue/index/data.mdb: Permission denied (the spool belongs to qrelay's "
        "run user: run this as root or as that user)"]


@pytest.mark.skipif(__import__("os").geteuid() != 0, reason="needs root to switch users")
def test_a_root_the_user_cannot_reach_is_one_line_for_every_command(tmp_path):
    # A ROOT under a directory closed to the caller: pathlib's is_dir() raises
    # EACCES (it is no "does not exist"), and most commands died in a traceback.
    import os
    import subprocess
    import sys

    from tests.conftest import REPO
    tmp_path.chmod(0o755)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o700)
    root = locked / "root"
    qrelay = [sys.executable, "-m", "engine.cli"]
    subprocess.run(qrelay + ["init", str(root), "--me", "mx.test"], cwd=REPO, check=True,
                   capture_output=True)
    (tmp_path / "qq" / "mess").mkdir(parents=True)
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO)}
    for words in (["qstat"], ["qread"], ["qshape"], ["why", "1"], ["hold", "1"], ["flush"],
                  ["showctl"], ["newmrh"], ["relayclients"], ["relayclients", "add"],
                  ["import-qmail"], ["run"]):
        extra = {"relayclients add": ["192.0.2.1"], "import-qmail": [str(tmp_path / "qq")],
                 "run": ["--listen", "127.0.0.1:0"]}.get(" ".join(words), [])
        args = words[:1] + ([words[1]] if words[0] == "relayclients" and len(words) > 1 else [])
        args += [str(root)] + words[len(args):] + extra
        r = subprocess.run(qrelay + args, cwd="/", capture_output=True, text=True, timeout=60,
                           user=65534, group=65534, extra_groups=[], env=env)
        assert r.returncode in (1, 2), (args, r.stderr)
        assert len(r.stderr.splitlines()) == 1 and "Permission denied" in r.stderr, (args, r.stderr)
    inject = subprocess.run(qrelay + ["inject", str(root), "a@far.test"], input="\nhi\n",
                            cwd="/", capture_output=True, text=True, timeout=60,
                            user=65534, group=65534, extra_groups=[], env=env)
    assert inject.returncode == 111, inject.stderr
    assert len(inject.stderr.splitlines()) == 1 and "Permission denied" in inject.stderr
    sendmail = subprocess.run([sys.executable, "-m", "engine.inject", "a@far.test"],
                              input="\nhi\n", cwd="/", capture_output=True, text=True,
                              timeout=60, user=65534, group=65534, extra_groups=[],
                              env={**env, "QRELAY_ROOT": str(root)})
    assert sendmail.returncode == 111, sendmail.stderr
    assert sendmail.stderr.splitlines() == [
        f"sendmail: fatal: {root}/control: Permission denied"], sendmail.stderr


def test_names_that_are_not_utf8_are_listed_as_their_bytes_in_a_strict_utf8_locale(root: Path):
    # A Debian box's en_US.UTF-8 gives Python a strict stdout (C.UTF-8 and C
    # give surrogateescape): a vpasswd name or .qmail line with a byte that is
    # no UTF-8 (vpopmail writes what it was given) must list as that byte, not
    # end the listing in a UnicodeEncodeError traceback.
    import os
    import subprocess
    import sys

    from tests.conftest import REPO
    assert invoke(["domain", "add", str(root), "example.com", "--uid", "89", "--gid", "89"]).exit_code == 0
    domain = root / "domains" / "example.com"
    (domain / ".qmail-sales").write_bytes(b"&j\xe9@example.org\n")
    with (domain / "vpasswd").open("ab") as f:
        f.write(b"k\xe9:x:1:0:k:/nonexistent:NOQUOTA\n")
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO),
           "PYTHONIOENCODING": "utf-8:strict"}
    for words, line in ((["alias", "list"], b"sales@example.com\t&j\xe9@example.org\n"),
                        (["user", "list"], b"k\xe9@example.com\tNOQUOTA\t-\n")):
        r = subprocess.run([sys.executable, "-m", "engine.cli", *words, str(root), "example.com"],
                           cwd="/", capture_output=True, timeout=60, env=env)
        assert (r.returncode, r.stderr) == (0, b""), r.stderr.decode(errors="replace")
        assert line in r.stdout
