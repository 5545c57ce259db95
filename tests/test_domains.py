"""locals / virtualdomains / percenthack / envnoathost as qmail-send applies them (spec §2)."""
from __future__ import annotations

import pytest

from engine.config.domains import DomainConfig, DomainConfigError, ascii_lower, load_domain_config


def control(root, **files):
    d = root / "control"
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name).write_text(text)
    return root


def test_ascii_lower_only():
    assert ascii_lower("ExAmPle.COM") == "example.com"
    assert ascii_lower("\u212a.TEST") == "\u212a.test"   # Kelvin sign untouched
    assert ascii_lower("\u00c9") == "\u00c9"


def test_missing_locals_means_me(tmp_path):
    cfg = load_domain_config(control(tmp_path, me="mx.example.com\n"))
    assert cfg.locals == frozenset({"mx.example.com"})
    assert cfg.is_local("MX.example.com")
    assert cfg.envnoathost == "mx.example.com"


def test_empty_locals_means_none(tmp_path):
    cfg = load_domain_config(control(tmp_path, me="mx.example.com\n", locals=""))
    assert cfg.locals == frozenset()
    assert cfg.resolve("joe@mx.example.com") == ("remote", "joe@mx.example.com")


def test_locals_exact_match_only(tmp_path):
    cfg = load_domain_config(control(tmp_path, me="mx\n", locals="Example.com\n# c\n.wild.test\n"))
    assert cfg.resolve("a@EXAMPLE.COM") == ("local", "a@EXAMPLE.COM")
    assert cfg.resolve("a@sub.example.com")[0] == "remote"
    assert cfg.resolve("a@x.wild.test")[0] == "remote"


def test_envnoathost(tmp_path):
    cfg = load_domain_config(control(tmp_path, me="mx.example.com\n"))
    assert cfg.resolve("postmaster") == ("local", "postmaster@mx.example.com")
    cfg = load_domain_config(control(tmp_path, envnoathost="other.test\n"))
    assert cfg.resolve("postmaster") == ("remote", "postmaster@other.test")


def test_percenthack(tmp_path):
    cfg = load_domain_config(control(tmp_path, me="mx\n", locals="mx\nlocal.test\n",
                                     percenthack="gw.test\nhop.test\n"))
    assert cfg.resolve("u%far.test@gw.test") == ("remote", "u@far.test")
    assert cfg.resolve("u%local.test@gw.test") == ("local", "u@local.test")
    # repeated while the new domain is listed
    assert cfg.resolve("u%far.test%hop.test@gw.test") == ("remote", "u@far.test")
    # not listed: unchanged
    assert cfg.resolve("u%far.test@local.test") == ("local", "u%far.test@local.test")
    # no % left: stops
    assert cfg.percent_rewrite("u@gw.test") == "u@gw.test"


def test_virtualdomains_order(tmp_path):
    cfg = load_domain_config(control(tmp_path, me="mx\n", locals="mx\n", virtualdomains="\n".join([
        "joe@v.test:special",
        "v.test:vuser",
        ".v.test:subuser",
        ".test:testuser",
        "except.v.test:",
        "no colon line",
        "V.TEST:vuser2",    # later duplicate key wins (constmap)
        "",
    ])))
    assert cfg.resolve("joe@v.test") == ("local", "special-joe@v.test")
    assert cfg.resolve("ann@V.test") == ("local", "vuser2-ann@V.test")
    assert cfg.resolve("ann@a.v.test") == ("local", "subuser-ann@a.v.test")
    assert cfg.resolve("ann@other.test") == ("local", "testuser-ann@other.test")
    assert cfg.resolve("ann@except.v.test") == ("remote", "ann@except.v.test")
    assert cfg.resolve("ann@example.org") == ("remote", "ann@example.org")
    assert cfg.resolve("ann@mx") == ("local", "ann@mx")   # locals first


def test_virtualdomains_catch_all(tmp_path):
    cfg = DomainConfig.build(me="mx", virtualdomains=[":catchall", "keep.test:"])
    assert cfg.resolve("a@any.where") == ("local", "catchall-a@any.where")
    assert cfg.resolve("a@keep.test") == ("remote", "a@keep.test")
    assert cfg.virtual_prepend("a@mx") == "catchall"


def test_missing_me(tmp_path):
    with pytest.raises(DomainConfigError, match="control/me is missing"):
        load_domain_config(control(tmp_path, locals="x\n"))


def test_unreadable_file(tmp_path):
    control(tmp_path, me="mx\n")
    (tmp_path / "control" / "locals").mkdir()
    with pytest.raises(DomainConfigError, match="unable to read"):
        load_domain_config(tmp_path)
