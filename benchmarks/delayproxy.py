"""A TCP proxy that puts a network path between a tool and Azurite: a fixed one-way delay each way (RTT = twice
it) and an optional bandwidth cap, and counts what crossed it (connections opened, most open at once, requests in
flight). Used by the benchmarks (``bench_upload.py --rtt``) and by tests that bound a run's concurrency at a
real round-trip time; loopback alone makes every request cost well under a millisecond, which hides waiting.

Run alone: .venv/bin/python benchmarks/delayproxy.py --target 127.0.0.1:10000 --delay-ms 20 [--mbit 100]

The delay is applied to each chunk read, from the moment it arrived, so a connection's bytes keep flowing
(pipelined, as on a long link) rather than being held one chunk per delay; a new connection's first bytes wait a
round trip more, its TCP handshake. The cap is one shared link per
direction: every connection's bytes queue for it. "In flight" is counted per connection as HTTP/1.1 uses it,
one request at a time, for the whole round trip the client waits: from the first request byte that reaches the
proxy (the client sent it then: the delay comes after) to the first response byte handed on to the client (after
its delay back), not to the moment it came from Azurite, which would leave the way back out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

CHUNK = 64 * 1024


@dataclass
class Counts:
    """What crossed the proxy since it started (or since ``reset``)."""

    connections: int = 0  # opened by clients
    open_now: int = 0
    most_open: int = 0
    in_flight: int = 0
    most_in_flight: int = 0
    requests: int = 0
    busy_seconds: float = 0.0  # time with at least one request in flight
    request_seconds: float = 0.0  # integral of requests in flight over time: / busy_seconds is the mean window
    _since: float = field(default_factory=time.monotonic)

    def _tick(self, now: float) -> None:
        if self.in_flight:
            self.busy_seconds += now - self._since
            self.request_seconds += self.in_flight * (now - self._since)
        self._since = now

    def flight(self, delta: int) -> None:
        self._tick(time.monotonic())
        self.in_flight += delta
        if delta > 0:
            self.requests += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)

    @property
    def mean_in_flight(self) -> float:
        """Requests in flight on average while any was."""
        return self.request_seconds / self.busy_seconds if self.busy_seconds else 0.0


class _Link:
    """One direction's bandwidth: chunks take their turn on it (None: no cap)."""

    def __init__(self, bytes_per_second: float | None):
        self.rate = bytes_per_second
        self.free_at = 0.0

    async def send(self, size: int, ready: float) -> None:
        """Wait until a chunk of *size* bytes, there to be sent from *ready* on, has crossed the link. Its turn
        starts when the link is free or when it was ready, whichever is later, not when this coroutine wakes:
        a wake-up late by a timer's slack would otherwise leave the link idle for that long on every chunk."""
        if self.rate is None:
            return
        loop = asyncio.get_running_loop()
        self.free_at = max(self.free_at, ready) + size / self.rate
        await asyncio.sleep(max(0.0, self.free_at - loop.time()))


class DelayProxy:
    """``with DelayProxy("127.0.0.1", 10000, delay_ms=20) as proxy:`` then connect to ``proxy.port``.

    Serves on 127.0.0.1 in a thread of its own (its event loop), so a synchronous caller can start tools
    against it and read ``counts`` while they run."""

    def __init__(self, host: str, port: int, delay_ms: float = 0.0, mbit: float | None = None):
        self.target = (host, port)
        self.delay = delay_ms / 1000
        rate = mbit * 1_000_000 / 8 if mbit else None
        self._links = (_Link(rate), _Link(rate))  # up (to the target), down
        self.counts = Counts()
        self.port = 0
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # with ``timeline = []``: (monotonic time, +1 a request's first line / -1 its answer's status line, text,
        # the connection's number: a request and its answer share it)
        self.timeline: list[tuple[float, int, str, int]] | None = None
        self._thread = threading.Thread(target=self._serve, name="delay-proxy", daemon=True)

    def __enter__(self) -> DelayProxy:
        self._thread.start()
        self._ready.wait(10)
        if not self.port:
            raise RuntimeError("the delay proxy did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def reset(self) -> Counts:
        """The counts so far; counting starts again from zero (connections open stay counted as open)."""
        with self._lock:
            old, self.counts = self.counts, Counts(open_now=self.counts.open_now, most_open=self.counts.open_now)
        return old

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())
        self._loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop.wait()
        # the connections still open end with the proxy, before its loop closes
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # asyncio holds tasks weakly, and the stream protocol drops its own once the client's side closes: a
        # connection still forwarding its last bytes upstream would be collected half-way
        me = asyncio.current_task()
        assert me is not None
        self._tasks.add(me)
        try:
            await self._forward(reader, writer)
        finally:
            self._tasks.discard(me)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        with self._lock:
            c = self.counts
            c.connections += 1
            number = c.connections
            c.open_now += 1
            c.most_open = max(c.most_open, c.open_now)
        waiting = [False]  # a request of this connection is in flight

        def sent(data: bytes) -> None:  # request bytes reached the proxy
            if not waiting[0]:
                waiting[0] = True
                with self._lock:
                    self.counts.flight(+1)
                    if self.timeline is not None:
                        self.timeline.append((time.monotonic(), +1, data[:160].split(b"\r\n")[0].decode("latin-1"),
                                              number))

        def answered(data: bytes = b"") -> None:
            if waiting[0]:
                waiting[0] = False
                with self._lock:
                    self.counts.flight(-1)
                    if self.timeline is not None:
                        self.timeline.append((time.monotonic(), -1, data[:40].split(b"\r\n")[0].decode("latin-1"),
                                              number))

        try:
            # a new connection's handshake is a round trip before its first byte can leave (TLS, which Azurite's
            # plain HTTP has not, costs one or two more against Azure): a tool that reuses connections saves it
            handshake = asyncio.get_running_loop().time() + 2 * self.delay
            await asyncio.gather(self._pump(reader, up_writer, self._links[0], arrived=sent, not_before=handshake),
                                 self._pump(up_reader, writer, self._links[1], delivered=answered))
        except asyncio.CancelledError:
            pass  # the proxy stops: asyncio's stream callback would report a cancelled connection as an error
        finally:
            answered()
            with self._lock:
                self.counts.open_now -= 1
            for w in (writer, up_writer):
                w.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link, *,
                    arrived: Callable[[bytes], None] = lambda _data: None,
                    delivered: Callable[[bytes], None] = lambda _data: None, not_before: float = 0.0) -> None:
        """Copy *reader* to *writer*, each chunk released *delay* after it *arrived* (or after *not_before*), then
        through *link*, and *delivered* as it is written on."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def read() -> None:
            try:
                while data := await reader.read(CHUNK):
                    arrived(data)
                    queue.put_nowait((max(loop.time(), not_before) + self.delay, data))
            except OSError:
                pass
            queue.put_nowait((loop.time() + self.delay, b""))

        async def write() -> None:
            while True:
                due, data = await queue.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                if not data:
                    with contextlib.suppress(OSError):
                        if writer.can_write_eof():
                            writer.write_eof()
                    return
                await link.send(len(data), due)
                delivered(data)
                writer.write(data)
                try:
                    await writer.drain()
                except OSError:
                    return

        await asyncio.gather(read(), write())


@contextlib.contextmanager
def behind(azurite, delay_ms: float, mbit: float | None = None) -> Iterator:
    """*azurite* (tests/azurite.py's ``Azurite``) reached through a ``DelayProxy``: an object with the same
    ``endpoint``, ``connection_string`` and ``process``, pointing at the proxy, and its ``proxy``."""
    with DelayProxy("127.0.0.1", azurite.port, delay_ms, mbit) as proxy:
        yield _Behind(azurite, proxy)


class _Behind:
    def __init__(self, azurite, proxy: DelayProxy):
        here, there = f"127.0.0.1:{proxy.port}", f"127.0.0.1:{azurite.port}"
        self.endpoint = azurite.endpoint.replace(there, here)
        self.connection_string = azurite.connection_string.replace(there, here)
        self.process = azurite.process
        self.port = proxy.port
        self.proxy = proxy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="HOST:PORT to forward to")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="one-way delay each way (RTT is twice it)")
    parser.add_argument("--mbit", type=float, help="bandwidth cap per direction, Mbit/s")
    args = parser.parse_args()
    host, _, port = args.target.rpartition(":")
    with DelayProxy(host, int(port), args.delay_ms, args.mbit) as proxy:
        print(f"listening on 127.0.0.1:{proxy.port}", flush=True)
        try:
            while True:
                time.sleep(5)
                c = proxy.counts
                print(f"connections {c.connections} (open {c.open_now}, most {c.most_open}); requests {c.requests},"
                      f" in flight most {c.most_in_flight}, mean {c.mean_in_flight:.1f}", flush=True)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
