"""`backout demo`: roll back a bad release of a demo shop, end to end, on one machine.

Starts the embedded broker, a `backout worker` and the demo shop, sends
checkouts through a good and a bad release of the orders service, fires an
alert for the bad one, follows the rollback and checks that the shop is
consistent again. See docs/demo.md.
"""

from __future__ import annotations

from consumers.demo.runner import run_demo
from consumers.demo.scenario import DEFAULT_ORDERS, DEFAULT_TIMEOUT, DemoOptions

__all__ = ["DEFAULT_ORDERS", "DEFAULT_TIMEOUT", "DemoOptions", "run_demo"]
