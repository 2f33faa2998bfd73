"""``--bwlimit``: one token bucket per process that paces the bytes sent to and read from the blob service.

The command line sets the process's limit (``set_process_limit``) before any client is made. Sync
clients made while a limit is set get a ``PacedAdapter``: request bodies leave in 16 KiB reads and
response bodies arrive in reads, each paid for from the bucket, so a 32 MiB block range trickles out
at the rate instead of bursting after a long wait. The asyncio uploader pays for each small file
before its request (``process_limiter``). Without a limit no client is wrapped: nothing is added to
the hot path.

A process that stops (Ctrl-C, SIGTERM) calls ``stop_waits``: every transfer still waiting for its share of
the rate then ends at once with ``TransferStopped`` instead of trickling out, so stopping never waits for the
bytes in flight at the cap.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable
from typing import Any

from requests.adapters import HTTPAdapter

from sitebackup.errors import InputError

ENV_BWLIMIT = "SITEBACKUP_BWLIMIT"
KIB = 1024
_UNITS = {"": 1, "k": KIB, "m": KIB**2, "g": KIB**3}
_RATE = re.compile(r"^(\d+(?:\.\d*)?)([kmg]?)(?:i?b)?$", re.IGNORECASE)
MIN_RATE = KIB
# the bucket saves at most this many seconds of the rate while idle: enough to bridge the gaps between
# requests of a busy window, small enough that no stretch of a run goes measurably over the cap
BURST_SECONDS = 0.1
RATE_HELP = "bytes per second: 512K, 10M, 1G (K, M, G = KiB, MiB, GiB); 0 or off for no limit"
STOP_POLL_SECONDS = 0.1  # how often a paced asyncio transfer looks whether the process stops
_stopping = threading.Event()


class TransferStopped(Exception):
    """The process stops: a transfer waiting for its share of the rate ends instead (not an I/O error: no client
    retries it)."""

    def __init__(self) -> None:
        super().__init__("stopped while paced by --bwlimit: the process is stopping")


def stop_waits() -> None:
    """End every paced wait of this process, now and from now on."""
    _stopping.set()


def parse_rate(text: str) -> int | None:
    """Bytes per second from ``512K``, ``10M``, ``1.5G``, ``65536``; None for ``0``/``off`` (no limit)."""
    value = text.strip().replace(" ", "")
    if value.lower() in ("0", "off"):
        return None
    match = _RATE.match(value)
    if not match:
        raise InputError(f"invalid --bwlimit {text!r}: use {RATE_HELP}")
    rate = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if rate < MIN_RATE:
        raise InputError(f"invalid --bwlimit {text!r}: at least 1K (1024 bytes per second)")
    return rate


class Limiter:
    """A token bucket of *rate* bytes a second, thread-safe, with a blocking and an asyncio ``acquire``.

    A caller takes its bytes at once and the balance may go negative: it then waits until its debt is
    paid, so concurrent callers queue in the order they came and the long-run rate is exact however
    large one request is.
    """

    def __init__(self, rate: int, *, burst: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.burst = burst if burst is not None else max(64 * KIB, rate * BURST_SECONDS)
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens = 0.0  # no credit at start: no window of the run goes over the rate
        self._last = clock()

    def reserve(self, n: int) -> float:
        """Take *n* bytes; the seconds to wait before moving them."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate) - n
            self._last = now
            return -self._tokens / self.rate if self._tokens < 0 else 0.0

    def acquire(self, n: int) -> None:
        wait = self.reserve(n)
        if wait > 0 and _stopping.wait(wait):
            raise TransferStopped()

    async def acquire_async(self, n: int) -> None:
        wait = self.reserve(n)
        while wait > 0:
            if _stopping.is_set():
                raise TransferStopped()
            step = min(wait, STOP_POLL_SECONDS)
            await asyncio.sleep(step)
            wait -= step


_process: Limiter | None = None


def set_process_limit(rate: int | None) -> None:
    """The limit of every client made from now on in this process (None: none)."""
    global _process
    _process = Limiter(rate) if rate else None


def process_limiter() -> Limiter | None:
    return _process


class _PacedBody:
    """A request body read by the HTTP library in blocks, each paid for before it goes out."""

    def __init__(self, body: Any, limiter: Limiter):
        self._read = body.read if hasattr(body, "read") else _BytesReader(body).read
        self._limiter = limiter

    def read(self, size: int = -1) -> bytes:
        data = self._read(size)
        if data:
            self._limiter.acquire(len(data))
        return data


class _BytesReader:
    def __init__(self, data: bytes | bytearray | memoryview):
        self._view = memoryview(data)
        self._pos = 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._view) if size is None or size < 0 else self._pos + size
        chunk = self._view[self._pos:end]
        self._pos += len(chunk)
        return bytes(chunk)


class PacedAdapter(HTTPAdapter):
    """A requests adapter whose request and response bodies are paced by *limiter*."""

    def __init__(self, limiter: Limiter, **kwargs: Any):
        self.limiter = limiter
        super().__init__(**kwargs)

    def send(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        # a fresh PreparedRequest per attempt: the SDK's retries re-send the original bytes
        if isinstance(request.body, (bytes, bytearray, memoryview)) or hasattr(request.body, "read"):
            request.body = _PacedBody(request.body, self.limiter)
        return super().send(request, *args, **kwargs)

    def build_response(self, req: Any, resp: Any) -> Any:
        # every read of the body (urllib3's stream() and read() alike) goes through resp.read
        read = resp.read

        def paced_read(*args: Any, **kwargs: Any) -> bytes:
            data: bytes = read(*args, **kwargs)
            if data:
                self.limiter.acquire(len(data))
            return data

        resp.read = paced_read
        return super().build_response(req, resp)
