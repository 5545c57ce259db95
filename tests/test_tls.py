"""engine.tls: control/servercert.pem as the server context, its settings and its reload."""
from __future__ import annotations

import os
import socket
import ssl
import threading
import warnings
from pathlib import Path

import pytest

from engine.config.settings import TlsSettings
from engine.tls import CERT_FILE, ServerTls, TlsError, build_context, check_certificate
from tests.smtp_harness import client_context, install_certificate

NAME = "mx.example.com"


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> tuple[str, str]:
    """A real TLS handshake over loopback TCP; (version, cipher) the client saw."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    errors: list[BaseException] = []

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError) as exc:
            errors.append(exc)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with client_ctx.wrap_socket(raw, server_hostname=NAME) as tls:
                out = (tls.version(), tls.cipher()[0])
                tls.sendall(b"x")
                return out
    finally:
        t.join(5)
        listener.close()


def test_missing_certificate_is_one_line_naming_the_file(root: Path) -> None:
    with pytest.raises(TlsError) as info:
        build_context(root, TlsSettings())
    text = str(info.value)
    assert CERT_FILE in text and "\n" not in text


def test_certificate_and_key_in_one_file_serve_tls12_and_up(root: Path) -> None:
    ca = install_certificate(root, NAME)
    ctx = build_context(root, TlsSettings())
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    version, _ = handshake(ctx, client_context(ca))
    assert version in ("TLSv1.2", "TLSv1.3")
    old = client_context(ca)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # TLS 1.1 is deprecated: that is the point
        old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((ssl.SSLError, OSError)):
        handshake(ctx, old)


def test_min_version_setting(root: Path) -> None:
    ca = install_certificate(root, NAME)
    ctx = build_context(root, TlsSettings(min_version="TLSv1.3"))
    assert handshake(ctx, client_context(ca))[0] == "TLSv1.3"
    only12 = client_context(ca)
    only12.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, OSError)):
        handshake(ctx, only12)
    with pytest.raises(TlsError, match=r"min_version = 'TLSv1\.0'"):
        build_context(root, TlsSettings(min_version="TLSv1.0"))


def test_ciphers_setting_and_tlsserverciphers(root: Path) -> None:
    ca = install_certificate(root, NAME)
    client = client_context(ca)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx = build_context(root, TlsSettings(ciphers="ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES128-GCM-SHA256"))
    assert "AES128-GCM" in handshake(ctx, client)[1]
    (root / "control" / "tlsserverciphers").write_text("ECDHE-RSA-AES256-GCM-SHA384\nECDHE-ECDSA-AES256-GCM-SHA384\n")
    assert "AES256-GCM" in handshake(build_context(root, TlsSettings()), client)[1]
    with pytest.raises(TlsError, match=r"\[tls\] ciphers: no cipher matches"):
        build_context(root, TlsSettings(ciphers="NO-SUCH-CIPHER"))


def test_a_broken_file_is_refused_naming_it(root: Path) -> None:
    (root / "control" / "servercert.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n")
    with pytest.raises(TlsError) as info:
        build_context(root, TlsSettings())
    assert str(info.value).startswith(CERT_FILE + ": cannot load")


def test_check_certificate_for_tls_listeners(root: Path) -> None:
    check_certificate(root, TlsSettings(), {"smtp"})  # STARTTLS is then simply not offered
    with pytest.raises(TlsError) as info:
        check_certificate(root, TlsSettings(), {"smtp", "submissions"})
    assert str(info.value).startswith(f"{CERT_FILE} is missing: the submissions listener")
    install_certificate(root, NAME)
    check_certificate(root, TlsSettings(), {"submissions"})
    (root / "control" / "servercert.pem").write_text("garbage\n")
    with pytest.raises(TlsError):
        check_certificate(root, TlsSettings(), {"smtp"})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_reload_on_change_swaps_the_context_and_keeps_old_sessions(root: Path) -> None:
    clock = Clock()
    tls = ServerTls(root, TlsSettings(), clock=clock)
    assert tls.context() is None and CERT_FILE in (tls.error or "")
    first_ca = install_certificate(root, NAME)
    assert tls.context() is None          # not re-checked within RECHECK_SECONDS
    clock.now += 2
    first = tls.context()
    assert first is not None
    handshake(first, client_context(first_ca))

    # A new certificate (another CA): new handshakes get it, the old context object is unchanged.
    second_ca = install_certificate(root, NAME)
    tls.reload()                            # SIGHUP: at once
    second = tls.context()
    assert second is not first
    handshake(second, client_context(second_ca))
    with pytest.raises(ssl.SSLError):
        handshake(second, client_context(first_ca))
    handshake(first, client_context(first_ca))   # a session made before keeps working

    # A broken file keeps the last good context; a removed one stops TLS.
    (root / "control" / "servercert.pem").write_text("half written")
    clock.now += 2
    assert tls.context() is second and "cannot load" in (tls.error or "")
    (root / "control" / "servercert.pem").unlink()
    clock.now += 2
    assert tls.context() is None


def test_a_removed_certificate_is_said_and_kept_while_an_implicit_tls_listener_needs_it(
        root: Path, caplog) -> None:
    """`qrelay run` does not start a submissions or pop3s listener without
    control/servercert.pem; removed later, every connection to them was
    reset, and no line said why. With such a listener the last certificate
    stays, as for a broken file; without, STARTTLS goes (qmail-tls), and a
    line says so."""
    import logging
    install_certificate(root, NAME)
    tls = ServerTls(root, TlsSettings())
    tls.required = True
    kept = tls.context()
    plain = ServerTls(root, TlsSettings())
    (root / CERT_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="qrelay.tls"):
        tls.reload()
        plain.reload()
    assert tls.context() is kept and plain.context() is None
    assert [r.getMessage() for r in caplog.records] == [
        f"{CERT_FILE} is missing; keeping the previous certificate",
        f"{CERT_FILE} is missing: STARTTLS is no longer offered"]
    second_ca = install_certificate(root, NAME)
    tls.reload()
    handshake(tls.context(), client_context(second_ca))


def test_reload_with_new_settings_rebuilds(root: Path) -> None:
    install_certificate(root, NAME)
    tls = ServerTls(root, TlsSettings())
    first = tls.context()
    tls.reload(TlsSettings(min_version="TLSv1.3"))
    assert tls.context() is not first
    assert tls.context().minimum_version == ssl.TLSVersion.TLSv1_3


def test_an_encrypted_key_is_refused_without_asking_for_a_passphrase(root: Path) -> None:
    """OpenSSL's default for an encrypted key is to prompt on the terminal (or
    read stdin) and wait: a receiver would hang on its event loop. The file is
    refused instead, saying why."""
    import sys

    from tests.smtp_harness import encrypted_certificate, run_without_a_terminal
    (root / CERT_FILE).write_bytes(encrypted_certificate(NAME))
    code = ("import sys; from engine.tls import build_context, TlsError\n"
            "from engine.config.settings import TlsSettings\n"
            "try:\n    build_context(sys.argv[1], TlsSettings())\nexcept TlsError as exc:\n"
            "    print(exc)\nelse:\n    print('loaded')\n")
    proc = run_without_a_terminal([sys.executable, "-c", code, str(root)])
    out, err = proc.stdout, proc.stderr
    assert "pass phrase" not in err.lower()
    line = out.strip()
    assert line.startswith(f"{CERT_FILE}: ") and "encrypted" in line and "\n" not in line
