"""How long to wait before trying again: exponential backoff with full jitter."""

from __future__ import annotations

import random


def full_jitter(attempt: int, base: float, cap: float) -> float:
    """A random wait in ``[0, min(cap, base * 2**(attempt - 1))]`` seconds.

    Full jitter spreads the retries of many clients over the whole window, so a broker that
    comes back is not hit by all of them in the same instant (the "thundering herd")."""
    return random.uniform(0, min(cap, base * 2 ** (attempt - 1)))
