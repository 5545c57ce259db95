"""Log rotation working? ROOT/log (qmail-send's lines) and ROOT/log/smtpd
(the receivers'), each a multilog directory (spec §6.7): `current`, `lock`,
rotated `@<tai64n>.s` (and `.u` after a crash). Rotation is the writers'
job (engine.log), so a `current` far past `[log] max_bytes`, more rotated
files than `max_files` - 1, or a directory nobody may write are findings."""
from __future__ import annotations

import os
import stat

from engine.doctor import Context, Report


def check(ctx: Context, report: Report) -> None:
    settings = ctx.settings.log
    for name, what in (("log", "qmail-send's log"), ("log/smtpd", "the SMTP log")):
        directory = ctx.root / name
        arg = ctx.arg(directory)
        if not directory.exists():
            if name == "log":       # a qmail home has none until `qrelay run` makes it
                report.note("logs", f"{directory} does not exist yet: qrelay run creates it")
            continue
        if not directory.is_dir():
            report.problem("logs", f"{directory} is not a directory", f"{what} cannot be written",
                           f"mv {arg} {arg}.old && mkdir {arg}")
            continue
        if not os.access(directory, os.W_OK | os.X_OK):      # root may write anything
            owner = directory.stat().st_uid
            if owner != os.geteuid():
                # Its writer is its owner (`qrelay run` as root gives it to [run] user),
                # not whoever runs doctor: nothing to chown to us.
                report.note("logs", f"{directory}: not checked: uid {os.geteuid()} may not "
                            f"write it (it belongs to uid {owner}); run qrelay doctor as root")
            else:
                report.problem("logs", f"{directory} is not writable by uid {os.getuid()}",
                               f"{what} and its rotation fail", f"chmod u+wx {arg}")
        current = directory / "current"
        try:
            st = os.stat(current)
        except FileNotFoundError:
            report.note("logs", f"{directory}: nothing written yet")
            continue
        if not stat.S_ISREG(st.st_mode):
            report.problem("logs", f"{current} is not a file", f"{what} cannot be written",
                           f"mv {ctx.arg(current)} {ctx.arg(current)}.old")
            continue
        if not os.access(current, os.W_OK) and st.st_uid == os.geteuid():
            report.problem("logs", f"{current} is not writable by uid {os.getuid()}",
                           f"{what} is lost", f"chmod u+w {ctx.arg(current)}")
        if st.st_size > 2 * settings.max_bytes:
            report.problem("logs", f"{current} holds {st.st_size} bytes, over twice [log] "
                           f"max_bytes ({settings.max_bytes})",
                           "rotation is not happening (another writer, or a copy left from "
                           "before): the file grows without bound",
                           f"mv {ctx.arg(current)} {arg}/@manual.s")
        rotated = [n for n in os.listdir(directory) if n.startswith("@")]
        if len(rotated) > settings.max_files - 1:
            report.problem("logs", f"{directory} holds {len(rotated)} rotated files, more than "
                           f"[log] max_files - 1 ({settings.max_files - 1})",
                           "old files are not pruned: the disk fills",
                           f"ls {arg}/@* | head -n {len(rotated) - settings.max_files + 1} "
                           "| xargs -d '\\n' rm --")
        crashed = [n for n in rotated if n.endswith(".u")]
        report.note("logs", f"{directory}: current {st.st_size} bytes, {len(rotated)} rotated"
                    + (f" ({len(crashed)} left by a crash)" if crashed else ""),
                    current_bytes=st.st_size, rotated=len(rotated))
