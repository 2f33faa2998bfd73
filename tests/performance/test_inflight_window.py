"""The adaptive window of requests in flight (``blob.inflight``), on a simulated path in virtual time: it grows to
fill a path whose round trip is long, goes back when growing does not pay (and not when it paid, however latency
climbed), stays where it started where the service is the bound (loopback), halves when the service throttles,
never passes its ceiling nor its bytes in flight, and a fixed window (--max-inflight) never moves. Threads hold
slots of the same window (``InFlight.held``: a large file's requests) without holding up its loop.

The path: a request takes the round-trip time, or longer when more are in flight than the service completes in
that time (it queues). Counts only: the window's width and the time taken in virtual time, never wall time."""

from __future__ import annotations

import asyncio
import heapq
import http.server
import itertools
import threading
import time

import pytest
from azure.core.exceptions import HttpResponseError
from azure.core.pipeline import AsyncPipeline
from azure.core.pipeline.transport import AsyncHttpTransport
from azure.core.rest import HttpRequest

from sitebackup.blob import clients, inflight
from sitebackup.blob.inflight import BYTES_IN_FLIGHT, FLOOR, InFlight, ThrottleSignal


class Path:
    """Virtual time; a request in flight completes after ``max(rtt, in flight / capacity)`` seconds."""

    def __init__(self, rtt: float, capacity: float):
        self.rtt, self.capacity = rtt, capacity
        self.now = 0.0
        self.in_flight = 0
        self._due: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def clock(self) -> float:
        return self.now

    async def request(self) -> None:
        self.in_flight += 1
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._due, (self.now + max(self.rtt, self.in_flight / self.capacity), next(self._order),
                                   future))
        await future
        self.in_flight -= 1

    async def run(self, window: InFlight, requests: int, on_done=lambda: None, size: int = 4096) -> float:
        """*requests* of *size* bytes through *window*, all wanted at once; the virtual seconds they took."""
        async def one() -> None:
            async with window.slot():
                window.carried(size)
                await self.request()
            on_done()

        tasks = [asyncio.ensure_future(one()) for _ in range(requests)]
        while not all(t.done() for t in tasks):
            for _ in range(8):  # let every task that can go on reach its next wait
                await asyncio.sleep(0)
            if self._due:
                self.now, _, future = heapq.heappop(self._due)
                future.set_result(None)
        return self.now


def widths(path: Path, window: InFlight, requests: int, size: int = 4096) -> list[int]:
    seen: list[int] = []

    async def main() -> None:
        await path.run(window, requests, lambda: seen.append(window.limit), size)

    asyncio.run(main())
    return seen


def test_at_a_long_round_trip_the_window_grows_until_the_service_is_the_bound():
    # 40 ms, a service that completes 2,000 requests a second: 80 in flight fill the path
    path = Path(rtt=0.040, capacity=2000)
    window = InFlight(32, 256, clock=path.clock)
    widths(path, window, 5000)
    assert 80 <= window.most <= 256
    # in virtual time, within 15 % of what the service allows: a window fixed at 32 would take 2.5 times as long
    assert path.now <= 1.15 * 5000 / 2000


def test_a_longer_round_trip_needs_and_gets_a_wider_window():
    widest = []
    for rtt in (0.020, 0.080):
        path = Path(rtt=rtt, capacity=2000)
        window = InFlight(32, 512, clock=path.clock)
        widths(path, window, 5000)
        widest.append(window.most)
    assert widest[1] > widest[0] >= 40


class BusyClient(Path):
    """A path behind a busy client: a request takes the round trip, 1.4 times it with more than 32 in flight, 2.2
    times it with more than 64: latency climbs with the requests in flight while throughput still grows with
    them (64 complete 1.4 times as many requests a second as 32, 128 1.3 times as many as 64)."""

    async def request(self) -> None:
        self.in_flight += 1
        slower = 1.0 if self.in_flight <= 32 else 1.4 if self.in_flight <= 64 else 2.2
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._due, (self.now + self.rtt * slower, next(self._order), future))
        await future
        self.in_flight -= 1


def test_a_doubling_that_paid_is_kept_though_latency_climbs_past_twice_the_round_trip():
    path = BusyClient(rtt=0.040, capacity=0)
    window = InFlight(32, 256, clock=path.clock)
    seen = widths(path, window, 8000)
    assert window.most == 128
    # once at 128, where a request takes 2.2 round trips, it is not given back: 128 paid
    assert min(seen[seen.index(128):]) == 128


def test_a_wider_window_that_does_not_pay_goes_back_and_is_tried_less_and_less_often():
    # 40 ms, a service of 600 requests a second: 24 in flight fill the path, so 32 do not queue much, and every
    # doubling to 64 is tried, found not to pay, and undone
    path = Path(rtt=0.040, capacity=600)
    window = InFlight(32, 256, clock=path.clock)
    seen = widths(path, window, 5000)
    assert window.most == 64
    tries = sum(1 for a, b in itertools.pairwise(seen) if b > a)
    rounds = len(seen) // 32
    assert 2 <= tries <= 10 < rounds


def test_where_the_service_is_the_bound_the_window_stays_at_its_start():
    # loopback: a request costs half a millisecond of path, the service does 2,000 a second whatever the window
    path = Path(rtt=0.0005, capacity=2000)
    window = InFlight(32, 256, clock=path.clock)
    assert set(widths(path, window, 5000)) == {32}


def test_the_window_never_passes_its_ceiling():
    path = Path(rtt=0.080, capacity=100_000)
    window = InFlight(32, 100, clock=path.clock)
    seen = widths(path, window, 3000)
    assert max(seen) == window.most == 100


def test_the_window_grows_no_wider_than_its_bytes_in_flight_allow():
    # 1 MiB requests over a long path: 64 of them are BYTES_IN_FLIGHT
    path = Path(rtt=0.080, capacity=100_000)
    window = InFlight(32, 256, clock=path.clock)
    seen = widths(path, window, 2000, size=1024 * 1024)
    assert max(seen) == window.most == BYTES_IN_FLIGHT // (1024 * 1024)
    # a start wider than that stays allowed: the window never shrinks for bytes alone
    path = Path(rtt=0.080, capacity=100_000)
    window = InFlight(32, 256, clock=path.clock)
    assert set(widths(path, window, 1000, size=8 * 1024 * 1024)) == {32}


def test_a_fixed_window_never_moves():
    path = Path(rtt=0.040, capacity=100_000)
    window = InFlight(64, 64, clock=path.clock)
    assert window.fixed
    assert set(widths(path, window, 2000)) == {64}
    window.throttled()
    assert window.limit == 64


def test_throttling_halves_the_window_once_a_round_and_never_below_the_floor():
    window = InFlight(32, 256)
    window.throttled()
    window.throttled()  # the same round: a burst of 503s is one signal
    assert window.limit == 16
    for _ in range(10):
        window._throttled = False  # a round went by
        window.throttled()
    assert window.limit == FLOOR


def test_a_smaller_window_lets_fewer_requests_in():
    async def main() -> int:
        window = InFlight(8, 8 + 1)  # adaptive, so it can be halved
        window.throttled()
        held = 0
        entered = asyncio.Event()
        release = asyncio.Event()

        async def one() -> None:
            nonlocal held
            async with window.slot():
                held += 1
                entered.set()
                await release.wait()

        tasks = [asyncio.ensure_future(one()) for _ in range(20)]
        for _ in range(10):
            await asyncio.sleep(0)
        most = held
        release.set()
        await asyncio.gather(*tasks)
        return most

    assert asyncio.run(main()) == 4


def test_throttling_while_a_wider_window_is_tried_does_not_go_back_to_the_one_before_it():
    # a window of 48 tries 64 (its ceiling); the service throttles then: halved to 32, it is not widened back to
    # the 48 the try started from when the next round is judged
    path = Path(rtt=0.040, capacity=100_000)
    window = InFlight(48, 64, clock=path.clock)
    seen: list[int] = []

    def done() -> None:
        seen.append(window.limit)
        if window.limit == 64 and 32 not in seen:
            window.throttled()

    asyncio.run(path.run(window, 400, done))
    halved = seen.index(32)
    assert max(seen[halved:halved + 2 * 32]) == 32  # the round it was halved in, and the next, stay at 32


class _Response:
    def __init__(self, status: int):
        self.http_response = type("R", (), {"status_code": status})()


@pytest.mark.parametrize("status, halved", [(503, True), (500, True), (201, False), (404, False), (412, False)])
def test_the_pipeline_policy_tells_the_window_when_the_service_throttles(status, halved):
    window = InFlight(32, 256)
    ThrottleSignal(window).on_response(None, _Response(status))
    assert window.limit == (16 if halved else 32)


class _Answering(AsyncHttpTransport):
    """A transport answering every request with *status*, without a network."""

    def __init__(self, status: int):
        self.status = status

    async def __aenter__(self) -> _Answering:
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def send(self, request, **kwargs):
        return type("R", (), {"status_code": self.status})()


@pytest.mark.parametrize("status, halved", [(503, True), (201, False)])
def test_the_policy_in_a_pipeline_sees_each_answer_and_passes_it_on(status, halved):
    async def main() -> tuple[int, int]:
        window = InFlight(32, 256)
        pipeline = AsyncPipeline(_Answering(status), [ThrottleSignal(window)])
        response = await pipeline.run(HttpRequest("GET", "http://127.0.0.1/c/b"))
        return window.limit, response.http_response.status_code

    assert asyncio.run(main()) == ((16 if halved else 32), status)


class _Busy(http.server.BaseHTTPRequestHandler):
    """A stand-in service on loopback answering every request with 503 Server Busy, as a throttling account does."""

    def do_HEAD(self) -> None:
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_PUT = do_HEAD

    def log_message(self, *args: object) -> None:
        pass


def test_a_throttled_answer_to_a_synchronous_client_halves_the_process_window(monkeypatch):
    """A large file's Put Blocks, the lock and the records go through the synchronous clients, not the asyncio
    pipeline that ``ThrottleSignal`` watches: their 503s reach the window through the clients' shared session."""
    monkeypatch.setenv(clients.ENV_RETRIES, "0")  # one answer is enough; no backoff to wait out
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Busy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    window, other = InFlight(32, 256), InFlight(64, 256)
    forget = inflight.listen(window, loop)
    forget_other = inflight.listen(other, loop)
    forget_other()  # a window no longer listening (its putter closed) is left alone
    try:
        account = ("DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=" + "A" * 86 + "==;"
                   f"BlobEndpoint=http://127.0.0.1:{server.server_address[1]}/devstoreaccount1;")
        client, _label = clients.make_service_client(clients.StorageSettings(connection_string=account))
        with pytest.raises(HttpResponseError):
            client.get_blob_client("c", "b").get_blob_properties()
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0), loop).result(timeout=10)  # the loop has run what it was given
        assert (window.limit, other.limit) == (16, 64)  # halved once in the round, however many answers said so
    finally:
        forget()
        loop.call_soon_threadsafe(loop.stop)
        server.shutdown()


def test_max_inflight_fixes_the_process_window():
    try:
        inflight.set_process_window(None)
        assert inflight.process_window(32, 256) == (32, 256)
        inflight.set_process_window(100)
        assert inflight.process_window(32, 256) == (100, 100)
    finally:
        inflight.set_process_window(None)


def test_the_ceiling_is_a_bounded_multiple_of_the_start_so_a_low_concurrency_stays_low():
    from sitebackup.model.work import GROWTH_BOUND, MOST_IN_FLIGHT, Concurrency

    assert Concurrency().requests == 32 and Concurrency().most_requests == MOST_IN_FLIGHT
    assert Concurrency(batches=1).most_requests == GROWTH_BOUND * 2
    assert Concurrency(batches=256).most_requests == 512  # never below where it starts


def test_threads_hold_slots_of_the_window_without_holding_up_its_loop_and_are_not_judged():
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    try:
        window = InFlight(2, 2)
        inside = most = left = 0
        changed = threading.Condition()
        leave = threading.Semaphore(0)

        def request() -> None:
            nonlocal inside, most, left
            with window.held(loop, 1000):
                with changed:
                    inside += 1
                    most = max(most, inside)
                    changed.notify_all()
                leave.acquire()
                with changed:
                    inside -= 1
            with changed:
                left += 1
                changed.notify_all()

        threads = [threading.Thread(target=request) for _ in range(6)]
        for t in threads:
            t.start()
        with changed:
            assert changed.wait_for(lambda: inside == 2, timeout=30)

        async def waiting() -> int:
            return window._waiting

        # the loop runs on while the four other threads come to wait for a slot (asked on the loop, where the
        # window lives)
        for _ in range(3000):
            if asyncio.run_coroutine_threadsafe(waiting(), loop).result(timeout=30) == 4:
                break
            time.sleep(0.01)
        else:
            raise AssertionError("four threads never waited for a slot")
        assert inside == 2
        for _ in threads:
            leave.release()
        for t in threads:
            t.join(30)
        assert left == 6 and most == 2

        async def after() -> tuple[int, int, int, bool]:
            async with window.slot(), window.slot():  # every slot was given back
                return window._done, window._sized, window._bytes, window._permits.locked()

        # their bytes count against the window's bytes in flight; they end no round of its judgement
        assert asyncio.run_coroutine_threadsafe(after(), loop).result(timeout=30) == (0, 6, 6000, True)
    finally:
        loop.call_soon_threadsafe(loop.stop)
