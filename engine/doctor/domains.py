"""Do rcpthosts, locals, virtualdomains and users/assign agree?

The guide's classic: a domain added to one file and forgotten in another.
What mail for a domain goes through, and what each gap costs:

    rcpthosts / morercpthosts.cdb   accepted from anyone (else 553 at RCPT)
    locals                          delivered locally as user@domain
    virtualdomains  D:P             delivered locally as P-user@D ...
    users/assign    +P-:…:home      ... in this home (vpopmail: the domain dir)
    smtproutes                      relayed to a named host (a backup MX)

Accepted but neither local, virtual nor routed: relayed to the domain's MX
— a loop when that MX is this host. Virtual without an assign line: the
mail goes to qmail-getpw's fallback (the `alias` user) or defers. Virtual
or assigned but not accepted: every outside sender gets a 553. And
postmaster@ME needs somewhere to go (an assign entry, a system user or
qmail's alias user), or its mail and every double bounce defer.
"""
from __future__ import annotations

import os
import re

from engine.doctor import Context, Report


def check(ctx: Context, report: Report) -> None:
    from engine.accounts.assign import load_assign
    from engine.config.cdb import CdbFile
    from engine.config.control import read_list
    from engine.config.domains import ascii_lower, load_domain_config
    from engine.delivery.routes import SmtpRoutes
    from engine.smtp.policy import RecipientPolicy

    root, control = ctx.root, ctx.root / "control"
    try:
        policy = RecipientPolicy.load(control)
        domains = load_domain_config(root)
        assign = load_assign(root)
        routes = SmtpRoutes.load(control)
    except Exception:  # noqa: BLE001 - unparseable files are the controls check's findings
        return
    accepted = [ascii_lower(h) for h in read_list(control / "rcpthosts", []) or []]
    try:
        more = CdbFile.open(control / "morercpthosts.cdb")
        accepted += [ascii_lower(k.decode("utf-8", "surrogateescape")) for k, _ in more.items()]
    except OSError:
        pass
    rcpthosts = ctx.arg(control / "rcpthosts")
    wild = {prefix: a for prefix, a in assign.wildcards().items()}
    problems_before = len(report.findings)

    def assigned(prepend: str) -> bool:
        return assign.lookup(f"{prepend}-x") is not None

    for domain in dict.fromkeys(accepted):
        if not domain or domain.startswith("."):
            continue        # a suffix entry accepts a whole tree; nothing to match it with
        probe = f"postmaster@{domain}"
        if domains.is_local(domain):
            continue
        prepend = domains.virtual_prepend(probe)
        if prepend is not None:
            if not assigned(prepend):
                home = root / "domains" / domain
                owner = _owner_of(root / "domains")
                line = f"+{prepend}-:{domain}:{owner}:{home}:-::"
                report.problem(
                    "domains", f"{domain} is accepted (rcpthosts) and virtual "
                    f"(virtualdomains: {domain}:{prepend}) but users/assign has no +{prepend}- line",
                    "its mail goes to qmail-getpw's fallback (the alias user) or defers with "
                    "`Unable to find alias user!`",
                    f"sed -i {ctx.arg(f'/^[.]$/i {line}')} {ctx.arg(root / 'users/assign')} && "
                    f"qrelay newu {ctx.arg(root)}")
            continue
        if routes.lookup(domain) is None:
            # A vpopmail domain whose virtualdomains line was lost: `qrelay
            # domain add` would refuse it (users/assign has it), the line will do.
            fix = (f"echo {domain}:{domain} >> {ctx.arg(control / 'virtualdomains')}"
                   if f"{domain}-" in wild else
                   f"qrelay domain add {ctx.arg(root)} {domain} (a backup MX: "
                   f"echo '{domain}:PRIMARY-MX' >> {ctx.arg(control / 'smtproutes')})")
            report.problem(
                "domains", f"{domain} is in rcpthosts but in neither locals, virtualdomains "
                "nor smtproutes",
                "its mail is accepted and relayed to its MX: a loop (#5.4.6) if that MX is "
                "this host", fix)

    for key, prepend in domains.virtualdomains.items():
        # `user@domain` and `.sub.domain` keys too: rcpthosts needs the domain,
        # or the same `.sub.domain`.
        host = key.rpartition("@")[2]
        domain = host.lstrip(".")
        if not prepend or not domain:
            continue
        if key == domain and domains.is_local(domain):
            pattern = _sed_literal(domain)
            report.problem("domains", f"{domain} is in both locals and virtualdomains ({key}:{prepend})",
                           "locals wins (qmail-send): the virtualdomains line is never used, and "
                           f"mail for user@{domain} goes to users/assign, a system user or the alias "
                           "user instead of the domain's mailboxes",
                           f"sed -i '/^{pattern}$/Id' {ctx.arg(control / 'locals')}")
        if not policy.domain_listed(host):
            report.problem("domains", f"{host} is in virtualdomains but not in rcpthosts",
                           "every sender outside gets 553 (not in my list of allowed rcpthosts)",
                           f"echo {host} >> {rcpthosts}")
        if not assigned(prepend) and domain not in accepted:
            # `qrelay domain add` refuses a domain virtualdomains has: drop the line first.
            # The line dropped is this key's own (not `domain:` for a user@ or .sub key).
            pattern = _sed_literal(key)
            fix = f"sed -i '/^{pattern}:/Id' {ctx.arg(control / 'virtualdomains')}"
            if key == domain:
                fix += f" && qrelay domain add {ctx.arg(root)} {domain}"
            report.problem("domains", f"{domain} is in virtualdomains ({key}:{prepend}) but "
                           f"users/assign has no +{prepend}- line",
                           "its mail goes to qmail-getpw's fallback (the alias user) or defers",
                           fix)

    targets = {p for p in domains.virtualdomains.values() if p}
    for prefix, a in wild.items():
        name = prefix[:-1] if prefix.endswith("-") else prefix
        if "." not in name or name in targets or domains.is_local(name):
            continue        # not a vpopmail-style domain line
        if name in accepted and routes.lookup(name) is None:
            continue        # reported above, as accepted but delivered nowhere
        report.problem("domains", f"users/assign has +{prefix} ({a.home}) but no virtualdomains "
                       f"line maps a domain to {name}",
                       "the assign line is never used: mail for the domain is not delivered "
                       "to that directory",
                       f"echo {name}:{name} >> {ctx.arg(control / 'virtualdomains')}"
                       + ("" if policy.domain_listed(name) else f" && echo {name} >> {rcpthosts}"))

    for domain in sorted(domains.locals):
        if domain != "localhost" and "." in domain and not policy.domain_listed(domain):
            report.problem("domains", f"{domain} is in locals but not in rcpthosts",
                           "every sender outside gets 553 for it", f"echo {domain} >> {rcpthosts}")
    _postmaster(ctx, report, domains, assign)
    _domain_postmasters(ctx, report)
    if len(report.findings) == problems_before:
        report.note("domains", f"rcpthosts, locals, virtualdomains and users/assign agree "
                    f"({len(set(accepted))} accepted, {len(domains.virtualdomains)} virtual, "
                    f"{len(assign)} assign entries)")


def _postmaster(ctx: Context, report: Report, domains, assign) -> None:
    """postmaster@ME (RFC 5321's must, and where double bounces go) needs a
    users/assign entry, a system user or qmail's alias user to be delivered:
    without one, qmail-lspawn's `Unable to find alias user!` defers it."""
    import pwd
    if not domains.is_local(domains.me) or assign.lookup("postmaster") is not None:
        return
    for name in ("postmaster", "alias"):
        try:
            if pwd.getpwnam(name).pw_uid != 0:
                return
        except KeyError:
            pass
    home = ctx.arg(ctx.root / "alias")
    report.problem(
        "domains", f"postmaster@{domains.me} has nowhere to go: no users/assign entry, "
        "no system user postmaster, no alias user",
        "its mail and every double bounce defer (Unable to find alias user!) until "
        "queuelifetime bounces them; RFC 5321 requires a postmaster",
        f"useradd -r -d {home} -s /usr/sbin/nologin alias && install -d -o alias {home} && "
        f"echo '&you@example.net' > {home}/.qmail-postmaster (qmail's INSTALL.alias: "
        ".qmail-root and .qmail-mailer-daemon the same)")


def _domain_postmasters(ctx: Context, report: Report) -> None:
    """postmaster@DOMAIN of every vpopmail domain (RFC 5321 4.5.1): vadddomain
    makes a postmaster user, `qrelay domain add` leaves it to the operator."""
    from engine.accounts.admin import AdminError, list_domains
    from engine.accounts.store import Accounts, AccountsError
    try:
        real = [d.name for d in list_domains(ctx.root) if d.alias_of is None]
        accounts = Accounts(ctx.root)
        missing = [d for d in real if accounts.local_verdict(f"postmaster@{d}") is False]
    except (AdminError, AccountsError, OSError):
        return          # unreadable tables are other checks' findings
    if not missing:
        return
    first = missing[0]
    more = f" (and {len(missing) - 1} more domains)" if len(missing) > 1 else ""
    report.problem(
        "domains", f"postmaster@{first}{more} has no mailbox, alias or catch-all",
        "RCPT TO:<postmaster@…> gets 550, and RFC 5321 4.5.1 requires every domain to take "
        "it (vadddomain makes a postmaster user)",
        f"qrelay alias add {ctx.arg(ctx.root)} postmaster@{first} you@example.net"
        + (" (the same for each)" if more else ""))


def _owner_of(path) -> str:
    try:
        st = os.stat(path)
        return f"{st.st_uid}:{st.st_gid}"
    except OSError:
        return "UID:GID"


def _sed_literal(text: str) -> str:
    """`text` matched literally in a sed address (`/^TEXT:/`): its regex
    characters and the `/` delimiter escaped."""
    return re.sub(r"([.*\[\]\\^$/])", r"\\\1", text)
