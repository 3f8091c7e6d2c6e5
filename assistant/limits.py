"""Rate limits for the chat server: token buckets per user and per client address.

Why: one person (or one script through `gradio_client`) must not be able to fill the
generation queue for everybody, or flood the feedback tables that training reads.
Every message (a new message, a comparison, a ranking, a regenerated reply) and every
piece of feedback (a vote, a choice, a ranking, a correction) takes one token from the
bucket of the user who sent it and one from the bucket of the address it came from;
when either is empty, the action is refused with the wait before the next token, and
nothing is generated or stored.

A bucket holds `per_minute` tokens and refills continuously at `per_minute` per 60 s,
so a burst of a minute's worth is allowed and the long-run rate is capped. An
address's bucket is `address_factor` times a user's (--address-limit-factor, 10 at
the server), because many people can share one address (a class behind one NAT,
everyone behind a proxy) while one person has one account. Buckets live
in memory (a restart refills them) and are shared by the server's threads under one lock.

What it is not: a login throttle (failed passwords back off in accounts.py) or a queue
limit (the Engine refuses work past --max-queue).

    limits = Limits(messages_per_minute=20, feedback_per_minute=60)
    wait = limits.take("messages", user_id=3, ip="203.0.113.7")
    if wait:
        print(too_many("messages", wait))   # "Too many messages: try again in 12 s."
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

KINDS = ("messages", "feedback")
PRUNE_AT = 10_000  # buckets kept before the full (idle) ones are dropped


@dataclass
class _Bucket:
    tokens: float
    at: float  # clock time of the last refill


class TokenBuckets:
    """Buckets of `capacity` tokens, refilled at `capacity / period_s` per second, by key.
    capacity 0 means no limit."""

    def __init__(self, capacity: float, period_s: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 scale: Callable[[str], float] = lambda key: 1.0):
        if capacity < 0 or period_s <= 0:
            raise ValueError(f"a bucket needs capacity >= 0 and a positive period, got {capacity} per {period_s} s")
        self.capacity = float(capacity)
        self.rate = self.capacity / period_s  # tokens per second
        self.clock = clock
        self.scale = scale  # a key's bucket holds capacity × scale(key) and refills as fast, relatively
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def _refilled(self, key: str, now: float) -> _Bucket:
        bucket = self._buckets.get(key)
        k = self.scale(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(self.capacity * k, now)
        else:
            bucket.tokens = min(self.capacity * k, bucket.tokens + (now - bucket.at) * self.rate * k)
            bucket.at = now
        return bucket

    def take(self, keys: list[str]) -> float:
        """Take one token from the bucket of every key, or from none of them: returns 0 when
        taken, otherwise the seconds until every one of them has a token again."""
        if not self.capacity or not keys:
            return 0.0
        with self._lock:
            now = self.clock()
            buckets = [self._refilled(key, now) for key in keys]
            wait = max((1 - b.tokens) / (self.rate * self.scale(key)) for key, b in zip(keys, buckets))
            if wait > 1e-9:  # not a float's rounding of a full token
                return wait
            for b in buckets:
                b.tokens -= 1
            if len(self._buckets) > PRUNE_AT:  # a full bucket is the same as no bucket
                self._buckets = {k: b for k, b in self._buckets.items()
                                 if b.tokens + (now - b.at) * self.rate * self.scale(k) < self.capacity * self.scale(k)}
            return 0.0


class Limits:
    """The server's two rate limits, each per user and per client address."""

    def __init__(self, messages_per_minute: float, feedback_per_minute: float, clock: Callable[[], float] = time.monotonic,
                 address_factor: float = 1.0):
        if address_factor < 1:
            raise ValueError(f"an address's limit is at least a user's: address_factor must be >= 1, got {address_factor}")

        def scale(key: str) -> float:
            return address_factor if key.startswith("ip:") else 1.0

        self.buckets = {"messages": TokenBuckets(messages_per_minute, clock=clock, scale=scale),
                        "feedback": TokenBuckets(feedback_per_minute, clock=clock, scale=scale)}

    def take(self, kind: str, user_id: int | None, ip: str) -> float:
        """One `kind` action ("messages" or "feedback") by `user_id` (None: not signed in)
        from address `ip` ("" when unknown): 0 when allowed, else the seconds to wait."""
        if kind not in self.buckets:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        keys = ([f"user:{user_id}"] if user_id is not None else []) + ([f"ip:{ip}"] if ip else [])
        return self.buckets[kind].take(keys)


def too_many(kind: str, wait_s: float) -> str:
    """What the person is told when a limit is hit."""
    what = {"messages": "Too many messages", "feedback": "Too much feedback at once"}[kind]
    return f"{what}: try again in {max(1, math.ceil(wait_s))} s."
