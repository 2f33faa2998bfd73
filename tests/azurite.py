"""Starting and stopping a real Azurite blob service on 127.0.0.1 for tests, the demo and benchmarks.

Azurite comes from the project's package.json (``npm ci``); nothing here installs it.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ACCOUNT = "devstoreaccount1"
# Azurite's published development key (documented by Microsoft, not a secret)
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
CLOSED = b"Azurite Blob service successfully closed"  # printed once its stores are saved and closed


PORTS_PER_WORKER = 1000
FIRST_PORT = 15000  # below Linux's ephemeral range (32768-60999): no outgoing connection takes one of these


def free_port() -> int:
    """A port nothing listens on now, for a server started after (Azurite, again after a restart) or for a
    test that wants one where nothing listens. It is released before use, so it comes from a range of its
    own per pytest-xdist worker, outside the ephemeral range the kernel hands to ``bind(0)`` and to
    outgoing connections: another worker or a connection cannot take it in between."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    first = FIRST_PORT + (int(worker) if worker.isdigit() else 0) % 16 * PORTS_PER_WORKER
    for port in random.sample(range(first, first + PORTS_PER_WORKER), PORTS_PER_WORKER):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {first}-{first + PORTS_PER_WORKER - 1}")


def azurite_binary() -> Path:
    path = ROOT / "node_modules" / ".bin" / "azurite-blob"
    if not path.exists():
        raise RuntimeError(f"Azurite is not installed at {path}: run 'npm ci' in {ROOT}")
    return path


@dataclass
class Azurite:
    port: int
    location: Path  # holds the log; also the data unless in_memory
    process: subprocess.Popen | None = None
    in_memory: bool = False  # --inMemoryPersistence: no disk I/O, for benchmarks
    access_log: bool = False  # one line per request in azurite.log, for tests that count requests

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/{ACCOUNT}"

    @property
    def connection_string(self) -> str:
        return (f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};"
                f"BlobEndpoint={self.endpoint};")

    def start(self, timeout: float = 30.0) -> "Azurite":
        self.location.mkdir(parents=True, exist_ok=True)
        log = open(self.location / "azurite.log", "ab")
        self.process = subprocess.Popen(
            [str(azurite_binary()), "--blobHost", "127.0.0.1", "--blobPort", str(self.port),
             "--skipApiVersionCheck", "--loose", *([] if self.access_log else ["--silent"]),
             *(["--inMemoryPersistence"] if self.in_memory else ["--location", str(self.location)])],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Azurite exited with code {self.process.returncode}; "
                                   f"see {self.location / 'azurite.log'}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Azurite did not listen on 127.0.0.1:{self.port} within {timeout:.0f}s")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop gracefully: the data is saved and the same location can be served again. Azurite saves its
        stores as soon as it is told to stop, then lingers until every idle keep-alive connection a client
        left open is gone; once it says it closed, the linger is cut short."""
        if self.process and self.process.poll() is None:
            log = self.location / "azurite.log"
            said = log.stat().st_size if log.exists() else 0
            self.process.terminate()
            deadline = time.monotonic() + timeout
            while self.process.poll() is None and time.monotonic() < deadline:
                with open(log, "rb") as fh:
                    fh.seek(said)
                    if CLOSED in fh.read():
                        break
                time.sleep(0.02)
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait()
        self.process = None


def start_azurite(location: Path, port: int | None = None, *, in_memory: bool = False) -> Azurite:
    return Azurite(port or free_port(), location, in_memory=in_memory).start()


if __name__ == "__main__":  # `python tests/azurite.py DIR [PORT]`: run one in the foreground (demo)
    import signal
    import sys

    where = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / ".azurite")
    server = start_azurite(where, int(sys.argv[2]) if len(sys.argv) > 2 else 10000)
    # Azurite runs in its own session: stop it with us, however we are asked to stop
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(server.connection_string, flush=True)
    try:
        server.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
