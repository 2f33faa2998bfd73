"""Lifecycle of the embedded backend: state directory, database, gRPC server, lease renewal.

``EmbeddedBackend.start()`` opens ``<state_dir>/state.db`` and serves the sidecar
protocol on a private unix socket (or on TCP for ``sitebackup serve``); ``stop()``
ends the work-item streams, stops the server and releases this process's leases so
another process can pick the work up at once. ``fault`` says why the state directory
stopped taking writes (disk full), if it did: the process then stops rather than hang.
"""

from __future__ import annotations

import os
import secrets
import socket
import sqlite3
import tempfile
import threading
from concurrent import futures
from pathlib import Path

import durabletask.internal.orchestrator_service_pb2_grpc as stubs
import grpc

from .servicer import DEFAULT_TASKHUB, Servicer
from .store import Store

# sun_path is 108 bytes on Linux; longer socket paths cannot be bound.
_MAX_SOCKET_PATH = 100


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class StateDirError(Exception):
    """The state directory or its database cannot be used."""


class EmbeddedBackend:
    def __init__(self, state_dir: Path, *, lease_seconds: float = 30.0):
        self.state_dir = Path(state_dir).absolute()
        self.lease_seconds = lease_seconds
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.store: Store | None = None
        self._servicer: Servicer | None = None
        self._server: grpc.Server | None = None
        self._socket_path: Path | None = None
        self._socket_dir_is_temp = False
        self._renewer: threading.Thread | None = None
        self._stop_renewing = threading.Event()
        self.fault: str | None = None

    def record_fault(self, reason: str) -> None:
        """Note the first reason the state directory refused a write (the database's or the work store's)."""
        if self.fault is None:
            self.fault = reason

    def __enter__(self) -> "EmbeddedBackend":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, listen: str | None = None) -> str:
        """Open the store and serve; returns the address for TaskHubGrpcWorker/Client."""
        if self._server is not None:
            raise RuntimeError("the embedded backend is already started")
        self.store = self._open_store()
        try:
            self.store.release_dead_owners(socket.gethostname(), _pid_alive)
        except sqlite3.Error as ex:  # the first write: a full disk shows here, before any work
            self.store.close()
            self.store = None
            raise StateDirError(f"cannot use state database {self.state_dir / 'state.db'}: {ex}; "
                                "use --state-dir to choose another location") from None
        self._servicer = Servicer(self.store, self.owner, self.lease_seconds)
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="sitebackup-backend"),
            options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)])
        stubs.add_TaskHubSidecarServiceServicer_to_server(self._servicer, server)
        try:
            if listen is not None:
                port = server.add_insecure_port(listen)
                host = listen.rsplit(":", 1)[0]
                address = f"{host}:{port}"
            else:
                self._socket_path = self._new_socket_path()
                server.add_insecure_port(f"unix:{self._socket_path}")
                address = f"unix:{self._socket_path}"
            server.start()
        except RuntimeError as ex:
            self.store.close()
            self.store = None
            raise StateDirError(f"cannot listen on {listen or self._socket_path}: {ex}") from None
        if self._socket_path is not None:
            os.chmod(self._socket_path, 0o600)
        self._server = server
        self._stop_renewing.clear()
        self._renewer = threading.Thread(target=self._renew_loop, name="sitebackup-lease-renewer", daemon=True)
        self._renewer.start()
        return address

    def stop(self) -> None:
        if self._server is None:
            return
        assert self._servicer is not None and self.store is not None
        self._servicer.shutdown()
        self._server.stop(grace=2).wait()
        self._server = None
        self._servicer.close()
        self._stop_renewing.set()
        if self._renewer is not None:
            self._renewer.join()
        try:
            self.store.release_leases(self.owner)
        except sqlite3.Error:  # a full disk: the next process releases them (this pid is gone by then)
            pass
        self.store.close()
        self.store = None
        if self._socket_path is not None:
            self._socket_path.unlink(missing_ok=True)
            if self._socket_dir_is_temp:
                self._socket_path.parent.rmdir()
            self._socket_path = None

    def worker_attached(self, instance_id: str, taskhub: str = DEFAULT_TASKHUB) -> bool:
        """True when a live process holds a lease on the instance's work or has a work-item stream open."""
        store = self.store or self._open_store()
        try:
            store.release_dead_owners(socket.gethostname(), _pid_alive)
            return store.worker_attached(taskhub, instance_id, self.lease_seconds)
        finally:
            if store is not self.store:
                store.close()

    # --- internals ------------------------------------------------------------------

    def _open_store(self) -> Store:
        hint = "use --state-dir to choose another location"
        db_path = self.state_dir / "state.db"
        try:
            if not self.state_dir.exists():
                self.state_dir.mkdir(parents=True, mode=0o700)
                os.chmod(self.state_dir, 0o700)
            if not os.access(self.state_dir, os.W_OK | os.X_OK):
                raise PermissionError("not writable")
            return Store(db_path, on_fault=self.record_fault)
        except sqlite3.DatabaseError as ex:
            if "not a database" in str(ex) or "malformed" in str(ex) or "corrupt" in str(ex):
                raise StateDirError(
                    f"state database {db_path} is corrupt or not a SQLite database ({ex}); "
                    f"it was left untouched: move it aside or {hint}") from None
            raise StateDirError(f"cannot use state database {db_path}: {ex}; {hint}") from None
        except OSError as ex:
            reason = ex.strerror or str(ex)
            raise StateDirError(f"cannot use state directory {self.state_dir}: {reason}; {hint}") from None

    def _new_socket_path(self) -> Path:
        name = f"{os.getpid()}-{secrets.token_hex(4)}.sock"
        sock_dir = self.state_dir / "sock"
        sock_dir.mkdir(mode=0o700, exist_ok=True)
        os.chmod(sock_dir, 0o700)
        if len(str(sock_dir / name)) <= _MAX_SOCKET_PATH:
            return sock_dir / name
        # A deep state dir cannot hold a bindable socket path; use a private temp dir instead.
        self._socket_dir_is_temp = True
        return Path(tempfile.mkdtemp(prefix="sitebackup-")) / name

    def _renew_loop(self) -> None:
        interval = self.lease_seconds / 3
        while not self._stop_renewing.wait(interval):
            try:
                assert self.store is not None
                self.store.renew_leases(self.owner, self.lease_seconds)
                self.store.release_dead_owners(socket.gethostname(), _pid_alive)
            except Exception:  # a busy or briefly unavailable database must not kill renewal
                continue
