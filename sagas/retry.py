"""Retry policy: exponential backoff with jitter.

The math is written here rather than taken from tenacity because the executor
schedules attempts on an injected clock and persists `next_attempt_at` in the
ledger (so retries survive a crash); tenacity owns its own sleeping loop and
cannot do either.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how patiently to retry a compensation.

    Args:
        max_attempts: attempts in all, the first included (>= 1).
        initial_delay: seconds before the second attempt.
        multiplier: growth factor of the delay per attempt (>= 1).
        max_delay: upper bound of one delay, in seconds.
        jitter: fraction of the delay randomised (0 = none, 0.5 = ±50 %), so that
            many failing compensations do not retry in lockstep.
        timeout: seconds one handler call may take before it counts as failed.
    """

    max_attempts: int = 5
    initial_delay: float = 1.0
    multiplier: float = 2.0
    max_delay: float = 60.0
    jitter: float = 0.2
    timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.initial_delay < 0 or self.max_delay < 0:
            raise ValueError("delays must not be negative")
        if self.multiplier < 1:
            raise ValueError("multiplier must be at least 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter must be between 0 and 1")
        if self.timeout <= 0:
            raise ValueError("timeout must be positive")

    def delay(self, failed_attempts: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after `failed_attempts` failures (1 = after the first)."""
        try:
            grown = self.initial_delay * self.multiplier ** max(failed_attempts - 1, 0)
        except OverflowError:  # long past the cap: a float cannot hold multiplier ** n
            grown = self.max_delay if self.initial_delay else 0.0
        base = min(grown, self.max_delay)
        if self.jitter == 0 or base == 0:
            return base
        spread = base * self.jitter
        # Clamped again: max_delay bounds every delay, jitter included.
        return min(self.max_delay, max(0.0, base + (rng or random).uniform(-spread, spread)))

    def exhausted(self, attempts: int) -> bool:
        """True when `attempts` attempts have used up the budget."""
        return attempts >= self.max_attempts
