"""Every crypt scheme found in real vpasswd files, through both backends (libxcrypt, libpass)."""
from __future__ import annotations

import pytest
from passlib import hash as lp

from engine.accounts import passwords
from engine.accounts.passwords import hash_password, scheme, verify

HASHES = {
    "des_crypt": lambda pw: lp.des_crypt.hash(pw),
    "md5_crypt": lambda pw: lp.md5_crypt.hash(pw),
    "sha256_crypt": lambda pw: lp.sha256_crypt.using(rounds=5000).hash(pw),
    "sha512_crypt": lambda pw: lp.sha512_crypt.using(rounds=5000).hash(pw),
    "sha512_crypt_rounds": lambda pw: lp.sha512_crypt.using(rounds=6000).hash(pw),
    "bcrypt_2a": lambda pw: lp.bcrypt.using(rounds=4, ident="2a").hash(pw),
    "bcrypt_2b": lambda pw: lp.bcrypt.using(rounds=4, ident="2b").hash(pw),
    "bcrypt_2y": lambda pw: lp.bcrypt.using(rounds=4, ident="2y").hash(pw),
}


@pytest.fixture(params=["libxcrypt", "libpass"])
def backend(request, monkeypatch):
    if request.param == "libpass":
        monkeypatch.setattr(passwords, "_xcrypt", lambda: None)
    elif passwords._xcrypt() is None:
        pytest.skip("libxcrypt not available here")
    return request.param


@pytest.mark.parametrize("kind", sorted(HASHES))
def test_every_scheme_verifies(kind, backend):
    stored = HASHES[kind]("s3cret pass")  # DES looks at 8 characters: the space is inside them
    assert verify("s3cret pass", stored)
    assert not verify("s3cret pasx" if kind != "des_crypt" else "s3cret_p", stored)
    assert not verify("", stored)


def test_scheme_names():
    assert scheme("$1$abc$def") == "md5_crypt"
    assert scheme("$5$abc$def") == "sha256_crypt"
    assert scheme("$6$abc$def") == "sha512_crypt"
    assert scheme("$2y$04$" + "a" * 53) == "bcrypt"
    assert scheme("MJ.tTjrQgJrK6") == "des_crypt"
    assert scheme("") is None and scheme("!") is None and scheme("*LK*") is None


@pytest.mark.parametrize("stored", ["", "!", "*", "NOPASS", "$6$", "$1$", "$2y$04$short", "abc"])
def test_empty_locked_or_malformed_never_match(stored, backend):
    assert not verify("", stored)
    assert not verify("anything", stored)


def test_nul_in_password_never_matches(backend):
    stored = lp.sha512_crypt.using(rounds=5000).hash("abc")
    assert not verify("abc\0def", stored)


def test_bcrypt_looks_at_72_bytes_like_crypt3(backend):
    stored = lp.bcrypt.using(rounds=4).hash("a" * 72)
    assert verify("a" * 72 + "ignored", stored)


def test_hash_password_is_vpopmail_sha512_crypt(backend):
    stored = hash_password("pässword")
    assert stored.startswith("$6$") and "rounds=" not in stored  # crypt(3)'s default 5000
    salt = stored.split("$")[2]
    assert len(salt) == passwords.SALT_LENGTH
    assert verify("pässword", stored)
    assert lp.sha512_crypt.verify("pässword", stored)  # libpass agrees
    assert hash_password("pässword") != stored  # fresh salt
    with pytest.raises(ValueError):
        hash_password("a\0b")


def test_backends_agree_on_the_same_salt():
    if passwords._xcrypt() is None:
        pytest.skip("libxcrypt not available here")
    for pw in ("x", "longer password with spaces", "ünïcode"):
        raw = pw.encode()
        assert passwords._hash_libpass(raw, "abcdefghijklmnop").encode() == \
            passwords._xcrypt().crypt(raw, b"$6$abcdefghijklmnop$")
