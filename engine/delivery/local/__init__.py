"""Local delivery (qmail-lspawn + qmail-local + vdelivermail): see courier.py."""
from engine.delivery.local.courier import (Forward, LocalConfig, LocalDelivery, LocalResult,
                                           assignment_for, deliver_one, load_local_config, to_lf)

__all__ = ["Forward", "LocalConfig", "LocalDelivery", "LocalResult", "assignment_for",
           "deliver_one", "load_local_config", "to_lf"]
