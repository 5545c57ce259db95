"""TLS certificates: control/servercert.pem (STARTTLS, STLS and the implicit-TLS
listeners) and control/clientcert.pem (remote delivery's client certificate).

Does the server certificate load, may the receivers read it, how long is each
valid, which names does it cover. An expired certificate still loads, as
qmail-tls's does, so `qrelay run` says nothing: clients that verify it refuse
the session (mail programs cannot send through 587 or 465, MTAs that insist on
TLS defer). Without servercert.pem there is no STARTTLS, and so no AUTH either
(never before TLS).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from engine.doctor import Context, Report, ago

_DAY = 86400


def check(ctx: Context, report: Report) -> None:
    from engine.delivery.tlspolicy import CLIENT_CERT_FILE
    from engine.tls import CERT_FILE, TlsError, build_context
    server = ctx.root / CERT_FILE
    if not server.exists():
        report.note("tls", f"{CERT_FILE} is missing: STARTTLS is not offered, and AUTH only as "
                    "CRAM-MD5 (accounts whose cleartext is kept: [accounts] keep_cleartext)"
                    if not ctx.settings.auth.allow_plaintext else
                    f"{CERT_FILE} is missing: STARTTLS is not offered, and AUTH LOGIN/PLAIN "
                    "passwords cross the wire in clear ([auth] allow_plaintext)")
    elif _not_ours_to_read(report, server):
        _readable(ctx, report, server)
    else:
        try:
            build_context(ctx.root, ctx.settings.tls)
        except TlsError as exc:
            report.problem("tls", str(exc), "qrelay run refuses to start with a TLS listener "
                           "(a running one keeps the certificate it had)",
                           f"openssl x509 -in {ctx.arg(server)} -noout -subject -enddate && "
                           f"openssl pkey -in {ctx.arg(server)} -noout")
            return
        _readable(ctx, report, server)
        _validity(ctx, report, server, CERT_FILE, names_for=_me(ctx))
    client = ctx.root / CLIENT_CERT_FILE
    if client.exists() and not _not_ours_to_read(report, client):
        _validity(ctx, report, client, CLIENT_CERT_FILE)


def _not_ours_to_read(report: Report, path: Path) -> bool:
    """True, with a note, when whoever runs doctor may not read `path`: it is
    root's and the run user's group's (README: chgrp qrelay, chmod 640), so
    that says nothing of whether `qrelay run` can load it."""
    if os.access(path, os.R_OK):        # root may read anything
        return False
    report.note("tls", f"{path}: not checked: uid {os.geteuid()} may not read it; "
                "run qrelay doctor as root")
    return True


def _readable(ctx: Context, report: Report, path: Path) -> None:
    from engine.privilege import PrivilegeError, readable_fix, run_user
    try:
        user = run_user(ctx.settings.run.user)
    except PrivilegeError:
        return          # the controls check's (qrelay run refuses to start)
    fix = readable_fix(path, user) if user is not None else None
    if fix:
        report.problem("tls", f"[run] user {user.name} cannot read {path}",
                       "the receivers cannot load it: qrelay run refuses to start", fix)


def _validity(ctx: Context, report: Report, path: Path, name: str,
              names_for: str | None = None) -> None:
    from cryptography import x509
    try:
        leaf = x509.load_pem_x509_certificates(path.read_bytes())[0]
    except (OSError, ValueError) as exc:
        report.problem("tls", f"{name}: no certificate can be read ({exc})",
                       "TLS with it fails", f"openssl x509 -in {ctx.arg(path)} -noout -text")
        return
    start = leaf.not_valid_before_utc.timestamp()
    end = leaf.not_valid_after_utc.timestamp()
    until = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(end))
    names = _names(leaf)
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    renew = (f"cat FULLCHAIN.pem KEY.pem > {ctx.arg(path)} "
             "(a new certificate; qrelay run picks it up by itself)")
    why = ("clients that verify it refuse TLS: mail programs cannot send through 587 or 465, "
           "and MTAs that insist on TLS defer (it still loads, as qmail-tls's does)")
    left = end - ctx.now
    if ctx.now < start:
        report.problem("tls", f"{name} is not valid before "
                       f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(start))}", why, renew)
    elif left <= 0:
        report.problem("tls", f"{name} expired {ago(-left)} ago ({until})", why, renew)
    elif left < ctx.doctor.cert_expiry_warn_days * _DAY:
        report.problem("tls", f"{name} expires in {ago(left)} ({until})",
                       "then " + why.replace("it still loads", "an expired one still loads"),
                       renew)
    else:
        report.note("tls", f"{name}: valid until {until} ({ago(left)}), for {shown or 'no name'}",
                    not_after=end, names=names)
    if names_for and not any(_matches(pattern, names_for) for pattern in names):
        report.note("tls", f"{name} does not name {names_for} (control/me): a client that "
                    "connects by that name and verifies it sees a mismatch")


def _names(cert) -> list[str]:
    """DNS names of the subjectAltName, else the subject's common name (RFC 6125)."""
    from cryptography import x509
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return [n.lower() for n in san.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        return [a.value.lower() for a in cert.subject.get_attributes_for_oid(
            x509.oid.NameOID.COMMON_NAME) if isinstance(a.value, str)]


def _matches(pattern: str, host: str) -> bool:
    """RFC 6125 matching: exact, or `*.` standing for one whole left-most label."""
    host = host.lower().rstrip(".")
    if pattern.startswith("*."):
        return "." in host and host.split(".", 1)[1] == pattern[2:]
    return pattern == host


def _me(ctx: Context) -> str | None:
    from engine.config.control import read_line
    try:
        return read_line(ctx.root / "control" / "me")
    except OSError:
        return None
