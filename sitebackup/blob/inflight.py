"""The window of requests in flight on the process's asyncio loop (``asyncput.AsyncPutter``): every small-file
upload and download takes a slot of it for its request, and so does each block range of a large file (its Put Block)
and each ranged GET of a large download, sent by activity threads with the synchronous client (``held``).

On loopback a run is bound by CPU, at a round-trip time of tens of milliseconds by the requests it keeps in
flight: no one number fits both. So the window adapts, as TCP's does. It starts at ``start`` and is judged
once a round, a round being as many completions as the window holds (about one round trip's worth), and only
while requests wait for a slot (else the window is not what bounds the run):

- it doubles while requests do not queue (a round's mean latency below ``RISING`` times the lowest a request
  has taken, the path's round trip: the path, not the service or the client's CPU, holds them) and the
  doubling pays: when the first round made of the wider window's requests only (the round after next: the next
  one still ends requests sent before it) is not ``GROWTH`` times faster than the narrower window's rounds were
  on average (not than the one round that let it grow: on a busy machine, that is a lucky one), the window goes
  back, and waits one round, then two, four... (at most ``MOST_HOLD``) before trying again. On loopback a round
  trip costs next to nothing: requests look queued there, or a doubling does not pay, and the window stays near
  its start;
- it gives back a quarter when latency has climbed to ``QUEUEING`` times the round trip (requests queue at a
  busy service or client), never below ``start`` nor below the widest window a doubling was found to pay for
  (that window's latency was part of what paid: on a busy client, latency climbs with the throughput);
- it halves when the service throttles (a 503 or 500 answer, seen by ``ThrottleSignal`` in the pipeline before
  its retry policy sends the request again, or by ``throttled_response`` in the session of the synchronous
  clients, for the requests activity threads send themselves: a large file's blocks, the lock, the records), at
  most once a round, never below ``FLOOR``.

It never grows above ``ceiling`` (the connection pool's size), nor past ``BYTES_IN_FLIGHT`` over the round's
mean request (the bytes its callers say requests carry, ``carried``): at its start the window holds what
--concurrency made it, and growing never holds more memory than that bound. ``--bwlimit`` caps throughput (a
request's wait for its share of the rate is part of its latency), so under a cap a wider window does not pay
and goes back. An explicit ``--max-inflight`` (``set_process_window``, set by the command line before any loop
is made) makes the window fixed (``start == ceiling``).

A request sent from a thread (``held``) takes a slot and counts its bytes (``carried``), but not in the judgement:
its latency is its megabytes' time, not the path's round trip, and would read as queueing (the window would give
back and stop growing for the small files that need it), and its completions are not the small requests' rounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from azure.core.pipeline.policies import AsyncHTTPPolicy

log = logging.getLogger("sitebackup.blob")

ENV_MAX_INFLIGHT = "SITEBACKUP_MAX_INFLIGHT"
MAX_INFLIGHT_LIMIT = 1024  # the widest --max-inflight accepted: each request in flight holds a connection
FLOOR = 4
# the bytes a growing window may hold in flight: it grows no wider than this over a round's mean request (the
# start, as wide as --concurrency made it, stays allowed); 4 KiB files never reach it, 1 MiB ones at 64
BYTES_IN_FLIGHT = 64 * 1024 * 1024
RISING = 1.5
GROWTH = 1.2
QUEUEING = 2.0
MOST_HOLD = 64
THROTTLED = frozenset({500, 503})  # Azure Storage's "server busy" / "operation timed out" answers


_process_fixed: int | None = None


def set_process_window(fixed: int | None) -> None:
    """--max-inflight: the window of every loop made from now on in this process, fixed (None: it adapts)."""
    global _process_fixed
    _process_fixed = fixed


def process_window(start: int, ceiling: int) -> tuple[int, int]:
    """The (start, ceiling) of this process's window: *start* and *ceiling*, or the fixed --max-inflight."""
    return (start, ceiling) if _process_fixed is None else (_process_fixed, _process_fixed)


class InFlight:
    """A window of ``limit`` requests in flight, adapting between ``FLOOR`` and *ceiling* (fixed when *start*
    is *ceiling*). Use ``async with window.slot():`` around a request, on one event loop."""

    def __init__(self, start: int, ceiling: int, clock: Callable[[], float] = time.monotonic):
        self.ceiling = max(1, ceiling)
        self.limit = max(1, min(start, self.ceiling))
        self.start = self.limit
        self.fixed = self.limit == self.ceiling
        self.most = self.limit  # the widest the window has been
        # a slot is a permit; a smaller window is owed permits, kept back as slots are freed
        self._permits = asyncio.Semaphore(self.limit)
        self._owed = 0
        self._clock = clock
        self._probe: tuple[int, float] | None = None  # the window grown from, and its rounds' mean rate
        self._rates, self._rate_sum = 0, 0.0  # the rounds judged at this width, and their rates' sum
        self._hold = 0  # rounds to let go by before growing again
        # the widest window a doubling was found to pay for: its latency was part of what paid, so latency alone
        # never takes the window below it (a throttling service does)
        self._paid = self.limit
        self._hold_next = 1  # ... after the next growth that does not pay
        # a round not judged: the first (it opens the connections), and the one after the window was narrowed
        self._settling = True
        self._base = float("inf")  # a request's latency, the lowest seen: the path's round trip
        self._round_start = clock()
        self._done = 0
        self._latency = 0.0
        self._bytes = self._sized = 0  # bytes carried by this round's requests, and by how many
        self._waiting = 0  # requests waiting for a slot now
        self._waited = False  # a request waited for a slot as one finished this round
        self._throttled = False  # the window was halved this round

    def slot(self) -> Slot:
        """One request's slot, taken on entering the ``async with`` and given back on leaving it."""
        return Slot(self)

    async def _take(self) -> float:
        """Wait for a slot; the time it was taken."""
        self._waiting += 1
        try:
            await self._permits.acquire()
            while self._owed:  # a permit the window no longer has: kept back, and another waited for
                self._owed -= 1
                await self._permits.acquire()
        finally:
            self._waiting -= 1
        return self._clock()

    def _give(self, began: float) -> None:
        """Give back a slot taken at *began*, its request judged."""
        self._release()
        self._finished(began)

    def _release(self) -> None:
        if self._owed:
            self._owed -= 1
        else:
            self._permits.release()

    @contextmanager
    def held(self, loop: asyncio.AbstractEventLoop, size: int) -> Iterator[None]:
        """A slot held by the calling thread, not *loop*'s (this window's), around one request carrying *size*
        bytes that it sends itself: the thread waits for the slot while the loop runs on (never call this on the
        loop's thread: it would wait for itself), and gives it back as it leaves. Its request is not judged (see
        the module's docstring)."""
        asyncio.run_coroutine_threadsafe(self._take_carrying(size), loop).result()
        try:
            yield
        finally:
            loop.call_soon_threadsafe(self._release)

    async def _take_carrying(self, size: int) -> None:
        await self._take()
        self.carried(size)

    def carried(self, size: int) -> None:
        """A request in a slot carries *size* bytes (its body, or the body it reads)."""
        self._bytes += size
        self._sized += 1

    def throttled(self) -> None:
        """The service asked to slow down: halve the window (once a round)."""
        if not self.fixed and not self._throttled:
            self._throttled = True
            self._probe = None  # a growth being tried is judged no more: going back to it would widen the window
            self._paid = self.start
            self._settling = True
            self._resize(self.limit // 2)

    def _finished(self, began: float) -> None:
        now = self._clock()
        self._waited = self._waited or self._waiting > 0
        self._done += 1
        self._latency += now - began
        self._base = min(self._base, now - began)
        if self._done < self.limit:
            return
        rate = self._done / max(now - self._round_start, 1e-6)
        latency = self._latency / self._done
        if not self.fixed and self._waited and not self._throttled:
            self._judge(rate, latency)
        self._round_start, self._done, self._latency, self._bytes, self._sized = now, 0, 0.0, 0, 0
        self._waited = self._throttled = False

    def _judge(self, rate: float, latency: float) -> None:
        """A round that the window bounded ended: keep or undo the last growth, grow, or give back."""
        if self._settling:
            self._settling = False
            return
        if self._probe is not None:
            narrower, before = self._probe
            self._probe = None
            if rate < before * GROWTH:  # more in flight did not pay: back, and wait longer before trying again
                self._resize(narrower)
                self._settling = True
                self._hold, self._hold_next = self._hold_next, min(2 * self._hold_next, MOST_HOLD)
                return
            self._hold_next = 1
            self._paid = self.limit
        self._rates += 1
        self._rate_sum += rate
        if self._hold:
            self._hold -= 1
        elif latency < self._base * RISING:
            widest = max(self.start, BYTES_IN_FLIGHT * max(1, self._sized) // max(1, self._bytes))
            wider = min(self.limit * 2, widest, self.ceiling)
            if wider > self.limit:
                self._probe = (self.limit, self._rate_sum / self._rates)
                self._resize(wider)
                # judged on the round after next: the next one still ends requests sent before the window widened
                self._settling = True
                return
        if latency >= self._base * QUEUEING and self.limit > self._paid:
            self._resize(max(self._paid, self.limit - self.limit // 4))
            self._settling = True

    def _resize(self, limit: int) -> None:
        limit = max(min(FLOOR, self.ceiling), min(limit, self.ceiling))
        if limit != self.limit:
            log.debug("requests in flight: window %d -> %d", self.limit, limit)
        change, self.limit = limit - self.limit, limit
        if change:
            self._rates, self._rate_sum = 0, 0.0
        self.most = max(self.most, limit)
        if change < 0:
            self._owed -= change
            return
        repaid = min(self._owed, change)
        self._owed -= repaid
        for _ in range(change - repaid):
            self._permits.release()


class Slot:
    """``InFlight.slot``: a plain async context manager. Every request enters one, and an ``asynccontextmanager``'s
    async generator (made, registered with the loop, stepped twice) cost more per request than the accounting."""

    __slots__ = ("_window", "_began")

    def __init__(self, window: InFlight):
        self._window = window
        self._began = 0.0

    async def __aenter__(self) -> None:
        self._began = await self._window._take()

    async def __aexit__(self, *_exc: object) -> None:
        self._window._give(self._began)


# the windows of this process, each with the loop it runs on: told of a throttled answer to a synchronous request
_listening: dict[InFlight, asyncio.AbstractEventLoop] = {}
_listening_lock = threading.Lock()


def listen(window: InFlight, loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
    """Have *window* (on *loop*) halve when a synchronous request of this process is throttled
    (``throttled_response``); returns what stops it."""
    with _listening_lock:
        _listening[window] = loop

    def forget() -> None:
        with _listening_lock:
            _listening.pop(window, None)

    return forget


def throttled_response(response: Any, *_args: Any, **_kwargs: Any) -> None:
    """A response hook of the session the synchronous clients share (``blob.clients``), which sees each attempt
    their retry policy makes: a throttled answer halves every window of the process, on its own loop (a window is
    not thread-safe), as ``ThrottleSignal`` does for the asyncio pipeline's answers. The service is one for both."""
    if response.status_code in THROTTLED:
        with _listening_lock:
            windows = list(_listening.items())
        for window, loop in windows:
            with contextlib.suppress(RuntimeError):  # its loop closed meanwhile
                loop.call_soon_threadsafe(window.throttled)


class ThrottleSignal(AsyncHTTPPolicy):  # type: ignore[type-arg]
    """A pipeline policy, placed after the retry policy so that it sees every attempt: tells *window* when the
    service throttles. An ``AsyncHTTPPolicy``, not a ``SansIOHTTPPolicy``: the async pipeline runs a SansIO policy
    through a wrapper that awaits each of its hooks, per request."""

    def __init__(self, window: InFlight):
        super().__init__()
        self._window = window

    async def send(self, request: Any) -> Any:
        response = await self.next.send(request)
        self.on_response(request, response)
        return response

    def on_response(self, request: Any, response: Any) -> None:
        if response.http_response.status_code in THROTTLED:
            self._window.throttled()
