"""Local delivery: qmail-lspawn + qmail-local + vdelivermail, without those programs.

- `courier`     — `deliver_one()` (one recipient, synchronous) and the async
                  `LocalDelivery` courier; results as qmail-lspawn reports them
- `dotqmail`    — choosing the .qmail file, its line types, the header lines
                  and environment qmail-local makes
- `maildir`     — durable Maildir writes, directory fsyncs shared by
                  concurrent deliveries
- `mbox`        — flock'd mbox appends with `>From ` quoting
- `program`     — `|command` lines through /bin/sh, bounded output, time limit
- `vdelivermail`— vpopmail's vdelivermail, natively
- `quota`       — Maildir++ maildirsize as vpopmail reads and rebuilds it
- `accounts`    — the three look-ups delivery asks engine.accounts for
"""
from engine.delivery.local.courier import (Forward, LocalConfig, LocalDelivery, LocalResult,
                                           assignment_for, deliver_one, load_local_config, to_lf)

__all__ = ["Forward", "LocalConfig", "LocalDelivery", "LocalResult", "assignment_for",
           "deliver_one", "load_local_config", "to_lf"]
