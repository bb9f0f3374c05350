"""Retry delays: exponential backoff with full jitter, and Retry-After parsing.

Pure functions; the caller supplies the random source and the current time, so
tests can pin both.
"""

from __future__ import annotations

import email.utils
import math
import random
from collections.abc import Callable


def backoff_delay_s(
    attempt: int, base_s: float, cap_s: float, uniform: Callable[[float, float], float] = random.uniform
) -> float:
    """Return a delay drawn uniformly from [0, min(cap, base * 2**(attempt-1))].

    Full jitter spreads the retries of many sites that failed together, so an API
    coming back from an outage is not hit by all of them at once.
    """
    if attempt < 1:
        attempt = 1
    # Cap the exponent first: 2**attempt overflows a float after about 1,000 attempts.
    exponent = min(attempt - 1, 60)
    ceiling = min(cap_s, base_s * math.pow(2.0, exponent))
    return uniform(0.0, ceiling)


def parse_retry_after(value: str | None, now_epoch_s: float) -> float | None:
    """Parse a Retry-After header (delta seconds or an HTTP date) into seconds from now.

    Return None for a missing or invalid value, so that the caller falls back to its
    own backoff. A date in the past gives 0.
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if value.isdigit():
        return float(int(value))
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if moment is None or moment.tzinfo is None:
        return None
    return max(0.0, moment.timestamp() - now_epoch_s)


def throttle_delay_s(retry_after_s: float | None, max_retry_after_s: float, fallback_s: float) -> float:
    """Return the wait for a throttled request: Retry-After capped, else the fallback."""
    if retry_after_s is None or not math.isfinite(retry_after_s):
        return fallback_s
    return min(retry_after_s, max_retry_after_s)
