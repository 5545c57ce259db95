"""engine/delivery/retry.py: qmail's retry formula and queuelifetime, with an injected clock."""
from __future__ import annotations

from engine.delivery.retry import DYING_TEXT, RetryPolicy


def _schedule(policy: RetryPolicy, channel: str, birth: float, until: float) -> list[float]:
    """Attempt times (relative to birth) if every attempt happens right on time."""
    now, times = birth, []
    while now - birth <= until:
        times.append(now - birth)
        now = policy.next_try(birth, now, channel)
    return times


def test_remote_schedule_is_20k_squared():
    times = _schedule(RetryPolicy(), "remote", 1_000_000, 604800)
    assert times[:6] == [0, 400, 1600, 3600, 6400, 10000]
    assert len(times) == 39  # k = 0..38; (20*39)^2 = 608400 is past the week
    assert times[-1] == (20 * 38) ** 2


def test_remote_schedule_counts_40_attempts_including_the_dying_one():
    p = RetryPolicy()
    birth, now, attempts = 0, 0, 0
    while True:
        attempts += 1
        if p.is_dying(birth, now):
            break
        now = p.next_try(birth, now, "remote")
    assert attempts == 40 and now == 608400


def test_local_schedule_is_10k_squared():
    times = _schedule(RetryPolicy(), "local", 0, 10000)
    assert times == [0, 100, 400, 900, 1600, 2500, 3600, 4900, 6400, 8100, 10000]


def test_late_attempt_uses_integer_sqrt_of_age():
    p = RetryPolicy()
    # opened late at age 1000: isqrt(1000)=31 -> (31+20)^2 = 2601
    assert p.next_try(500, 1500, "remote") == 500 + 2601
    assert p.next_try(500, 1500.9, "remote") == 500 + 2601
    # a clock behind birth counts as age 0
    assert p.next_try(500, 400, "remote") == 900


def test_configured_skips():
    p = RetryPolicy(remote_skip=1)
    assert p.next_try(0, 0, "remote") == 1
    assert p.next_try(0, 1, "remote") == 4


def test_dying_is_strictly_after_lifetime():
    p = RetryPolicy(queuelifetime=100)
    assert not p.is_dying(0, 100)
    assert p.is_dying(0, 101)


def test_final_result_turns_deferral_of_dying_job_into_failure():
    z = "Sorry, I wasn't able to establish an SMTP connection. (#4.4.1)\n"
    assert RetryPolicy.final_result("Z", z, dying=True) == ("D", z + DYING_TEXT)
    assert RetryPolicy.final_result("Z", z, dying=False) == ("Z", z)
    assert RetryPolicy.final_result("K", "ok\n", dying=True) == ("K", "ok\n")
    assert RetryPolicy.final_result("Z", "no newline", True)[1] == "no newline\n" + DYING_TEXT
