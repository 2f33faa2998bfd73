"""Benchmark: embedded SQLite backend vs the SDK's in-memory backend on a when_all fan-out.

Run: .venv/bin/python benchmarks/bench_backend.py [N ...]   (default: 1000 5000)
Prints one row per (N, backend) with wall seconds and the embedded/in-memory ratio.
"""

from __future__ import annotations

import logging
import socket
import sys
import tempfile
import time
from pathlib import Path

from durabletask import client, task, worker
from durabletask.testing import InMemoryOrchestrationBackend

from sitebackup.durable.backend import EmbeddedBackend

QUIET = logging.getLogger("bench.quiet")
QUIET.setLevel(logging.WARNING)


def double(ctx: task.ActivityContext, x: int) -> int:
    return 2 * x


def fan_out(ctx: task.OrchestrationContext, n: int):
    results = yield task.when_all([ctx.call_activity(double, input=i) for i in range(n)])
    return sum(results)


def run(address: str, n: int) -> float:
    w = worker.TaskHubGrpcWorker(host_address=address, logger=QUIET)
    w.add_orchestrator(fan_out)
    w.add_activity(double)
    w.start()
    c = client.TaskHubGrpcClient(host_address=address, logger=QUIET)
    try:
        start = time.perf_counter()
        iid = c.schedule_new_orchestration(fan_out, input=n)
        state = c.wait_for_orchestration_completion(iid, timeout=600)
        elapsed = time.perf_counter() - start
        assert state is not None and state.serialized_output == str(n * (n - 1)), state
        return elapsed
    finally:
        c.close()
        w.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def in_memory(n: int) -> float:
    port = free_port()
    backend = InMemoryOrchestrationBackend(port=port, max_history_size=1_000_000)
    backend.start()  # binds [::]:port; reachable on 127.0.0.1
    try:
        return run(f"127.0.0.1:{port}", n)
    finally:
        backend.stop()


def embedded(n: int) -> float:
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBackend(Path(tmp) / "state") as backend:
        return run(f"unix:{backend._socket_path}", n)


def main(sizes: list[int]) -> None:
    print(f"{'N':>6}  {'in-memory s':>12}  {'embedded s':>11}  {'ratio':>6}")
    for n in sizes:
        mem = in_memory(n)
        emb = embedded(n)
        print(f"{n:>6}  {mem:>12.2f}  {emb:>11.2f}  {emb / mem:>6.2f}", flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [1000, 5000])
