"""Delivery: handing queued messages to the next hop.

- `routes`     control/smtproutes, matched as qmail-remote does;
- `mx`         MX / A / AAAA resolution with aiodns, cached by TTL (`MxResolver`);
- `smtpclient` outbound SMTP connections and the per-host connection pool;
- `remote`     `RemoteDelivery`: qmail-remote's role for many recipients and
               messages at once, returning qmail-style K/Z/D results.

The scheduler (engine/queue) decides what to deliver and when; this package
only delivers and reports, it never touches the spool.
"""
