"""`qrelay doctor ROOT ADDRESS`: how qrelay would deliver to an address,
without delivering anything.

Local (locals / virtualdomains, after qmail-send's rewrite): the users/assign
entry qmail-lspawn would pick, the `.qmail` file qmail-local would read and
each of its lines; for vpopmail's vdelivermail, the vpasswd user and the
Maildir (or the `.qmail-default`'s answer for an unknown user). Remote: the
smtproutes relay or the MX addresses in the order delivery tries them. A
step that would fail (no mailbox, a writable .qmail, a missing Maildir, no
MX) is a finding, with the text the delivery would log.
"""
from __future__ import annotations

import asyncio
import os

from engine.doctor import Context, Report


def check(ctx: Context, report: Report, address: str) -> None:
    from engine.config.domains import DomainConfigError, load_domain_config
    try:
        domains = load_domain_config(ctx.root)
    except DomainConfigError as exc:
        report.problem("route", str(exc), "nothing can be routed", f"qrelay doctor {ctx.arg(ctx.root)}")
        return
    channel, rewritten = domains.resolve(address)
    if rewritten != address:
        report.note("route", f"qmail-send rewrites {address} to {rewritten}", rewritten=rewritten)
    if channel == "remote":
        _remote(ctx, report, rewritten)
    else:
        _local(ctx, report, address, rewritten)


def _remote(ctx: Context, report: Report, address: str) -> None:
    from engine.delivery.mx import ResolveError
    from engine.delivery.remote import RemoteConfigError, RemoteDelivery, load_remote_config
    domain = address.rpartition("@")[2]
    try:
        config = load_remote_config(ctx.root)
    except RemoteConfigError as exc:
        report.problem("route", str(exc), "remote delivery does not start",
                       f"qrelay doctor {ctx.arg(ctx.root)}")
        return
    route = config.routes.lookup(domain)
    how = f"smtproutes relay {route.relay}" if route else "MX"

    async def targets():
        remote = RemoteDelivery(config)
        try:
            return await remote.targets(domain)
        finally:
            await remote.resolver.close()
    try:
        found, port = asyncio.run(targets())[:2]
    except ResolveError as exc:
        report.problem("route", f"remote delivery to {domain} ({how}): {exc.text.strip()}",
                       "the mail defers" if exc.status == "Z" else "the mail bounces",
                       f"qrelay doctor {ctx.arg(ctx.root)} {domain}")
        return
    order = ", ".join(f"{t.ip} ({t.name}, preference {t.preference})" for t in found)
    report.note("route", f"remote, by {how}: tried in this order on port {port}: {order}",
                channel="remote", port=port,
                hosts=[{"ip": t.ip, "name": t.name, "preference": t.preference} for t in found])


def _local(ctx: Context, report: Report, address: str, rewritten: str) -> None:
    from engine.accounts.store import Accounts, AccountsError, parse_qmail_default
    from engine.delivery.local.dotqmail import (LocalPermanent, LocalTemporary, find_dotqmail,
                                                parse_lines)
    accounts = Accounts(ctx.root)
    local = rewritten.rpartition("@")[0]
    try:
        a = accounts.assign().lookup(local)
    except AccountsError as exc:
        report.problem("route", str(exc), "local delivery defers", f"qrelay newu {ctx.arg(ctx.root)}")
        return
    if a is None:
        report.note("route", f"local: users/assign has no entry for {local!r}: qmail-getpw's "
                    "fallback (a system user, else the alias user) decides", channel="local")
        return
    report.note("route", f"local: users/assign entry user {a.user}, uid {a.uid}, gid {a.gid}, "
                f"home {a.home}, dash {a.dash!r}, ext {a.ext!r}", channel="local", user=a.user,
                uid=a.uid, gid=a.gid, home=a.home, dash=a.dash, ext=a.ext)
    try:
        dq = find_dotqmail(a.home, a.dash, a.ext)
    except (LocalTemporary, LocalPermanent) as exc:
        temporary = isinstance(exc, LocalTemporary)
        report.problem("route", f"{address}: {str(exc).strip()}",
                       "delivery defers" if temporary else "the mail bounces",
                       f"qrelay doctor {ctx.arg(ctx.root)}" if temporary else
                       f"qrelay alias add {ctx.arg(ctx.root)} {address} TARGET")
        return
    if dq.path is None:
        report.note("route", "no .qmail file: the default delivery (control/defaultdelivery, "
                    "else ./Maildir/) in the home", qmail=None)
        return
    path = os.path.join(a.home, dq.path)
    text = dq.content.decode("utf-8", "surrogateescape")
    report.note("route", f".qmail file: {path}" + (f" ($DEFAULT {dq.default!r})"
                                                   if dq.default is not None else ""),
                qmail=path)
    if not text:        # qmail-local: an empty .qmail file means the default delivery
        from engine.delivery.local.courier import load_local_config
        report.note("route", "it is empty: the default delivery (control/defaultdelivery, "
                    "else ./Maildir/)")
        text = load_local_config(ctx.root).default_delivery
    try:
        lines = parse_lines(text)
    except LocalTemporary as exc:
        report.problem("route", f"{path}: {str(exc).strip()}", "delivery defers",
                       f"${{EDITOR:-vi}} {ctx.arg(path)}")
        return
    for ins in lines:
        if ins.kind == "comment":
            continue
        if ins.kind in ("maildir", "mbox"):
            target = os.path.normpath(os.path.join(a.home, ins.arg))
            report.note("route", f"{ins.kind}: {target}", kind=ins.kind, target=target)
            if ins.kind == "maildir" and not os.path.isdir(os.path.join(target, "new")):
                report.problem("route", f"{target} is not a Maildir (no new/)",
                               "delivery defers (Unable to chdir to maildir)",
                               f"(umask 077 && mkdir -p {ctx.arg(target)}/{{cur,new,tmp}}) && "
                               f"chown -R {a.uid}:{a.gid} {ctx.arg(target)}")
        elif ins.kind == "forward":
            report.note("route", f"forward to {ins.arg}", kind="forward", target=ins.arg)
        elif ins.kind == "program":
            default = parse_qmail_default(f"|{ins.arg}")
            if default.vdelivermail:
                _vdelivermail(ctx, report, accounts, address, default.argument)
            else:
                report.note("route", f"program: {ins.arg}", kind="program", target=ins.arg)


def _vdelivermail(ctx: Context, report: Report, accounts, address: str, argument: str) -> None:
    from engine.accounts.store import AccountsError
    try:
        box = accounts.mailbox(address)
    except AccountsError as exc:
        report.problem("route", str(exc), "delivery defers (system error)",
                       f"qrelay user list {ctx.arg(ctx.root)} {address.rpartition('@')[2]}")
        return
    if box is not None:
        own = os.path.join(box.user.directory, ".qmail")
        if os.path.isfile(own):
            report.note("route", f"vdelivermail: vpasswd user {box.user.name}; the user's own "
                        f".qmail: {own}", kind="vpopmail", qmail=own)
            return
        report.note("route", f"vdelivermail: vpasswd user {box.user.name}, Maildir "
                    f"{box.maildir} (quota {box.user.quota or 'none'})", kind="vpopmail",
                    user=box.user.name, maildir=box.maildir, quota=box.user.quota)
        if not os.path.isdir(os.path.join(box.maildir, "new")):
            report.problem("route", f"{box.maildir} is missing or not a Maildir",
                           "vdelivermail cannot deliver: the mail defers",
                           f"(umask 077 && mkdir -p {ctx.arg(box.maildir)}{{cur,new,tmp}}) && "
                           f"chown -R {box.assignment.uid}:{box.assignment.gid} "
                           f"{ctx.arg(box.user.directory)}")
        return
    if argument == "bounce-no-mailbox":
        report.problem("route", f"{address}: no vpasswd user, and the domain's .qmail-default "
                       "bounces (bounce-no-mailbox)",
                       "the mail is refused at RCPT (550) or bounced (#5.1.1)",
                       f"qrelay user add {ctx.arg(ctx.root)} {address} (or: qrelay alias add "
                       f"{ctx.arg(ctx.root)} {address} TARGET)")
    elif argument == "delete":
        report.note("route", "vdelivermail: no such user; the catch-all deletes the mail",
                    kind="vpopmail", catchall="delete")
    else:
        report.note("route", f"vdelivermail: no such user; the catch-all sends it to {argument}",
                    kind="vpopmail", catchall=argument)
