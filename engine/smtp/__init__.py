"""SMTP in: the receiver processes (receiver.py: one event loop per process,
session.py: qmail-smtpd's dialogue), the configuration snapshot they serve
with (config.py), and the policy they apply (policy.py: badmailfrom,
rcpthosts, relay hardening, unknown mailboxes). Which processes run is
engine.run's service table; the Received lines are engine.received.
"""
