"""Lifecycle of the embedded backend: state directory, database, gRPC server, lease renewal.

``EmbeddedBackend.start()`` opens ``<state_dir>/state.db`` and serves the sidecar
protocol on a private unix socket (or, for ``sitebackup serve``, on TCP with a required
token); ``stop()`` ends the work-item streams, stops the server and releases this
process's leases so another process can pick the work up at once. ``fault`` says why the
state directory stopped taking writes (disk full), if it did: the process then stops rather
than hang.
"""

from __future__ import annotations

import os
import secrets
import socket
import sqlite3
import tempfile
import threading
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path

import durabletask.internal.orchestrator_service_pb2_grpc as stubs
import grpc

from . import statedir
from .guard import Guard
from .servicer import DEFAULT_TASKHUB, MAX_MESSAGE, PING_SECONDS, Servicer
from .statedir import Damage, ServeLock, StateDirError
from .store import SCHEMA, Store

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


class EmbeddedBackend:
    def __init__(self, state_dir: Path, *, lease_seconds: float = 30.0, ping_seconds: float = PING_SECONDS):
        self.state_dir = Path(state_dir).absolute()
        self.lease_seconds = lease_seconds
        self.ping_seconds = ping_seconds
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.store: Store | None = None
        self.damage = Damage(self.state_dir / statedir.DB_NAME)
        self._lock = ServeLock(self.state_dir)
        self.token_file: Path | None = None
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

    def start(self, listen: str | None = None, token: str | None = None) -> str:
        """Open the store and serve; returns the address for TaskHubGrpcWorker/Client.

        With *listen* (``sitebackup serve``) no other backend may use the state directory meanwhile,
        and every call must present *token*, by default the one in ``token_file`` (created if missing)."""
        if self._server is not None:
            raise RuntimeError("the embedded backend is already started")
        statedir.prepare(self.state_dir)
        self._lock.acquire(exclusive=listen is not None)
        try:
            if listen is not None and token is None:
                self.token_file, token = statedir.serve_token(self.state_dir)
            if listen is not None and len(token or "") < statedir.MIN_TOKEN:
                raise StateDirError(f"a serve token needs at least {statedir.MIN_TOKEN} characters")
            self.store = self._open_store()
            try:
                with self._guarded():
                    self.store.release_dead_owners(socket.gethostname(), _pid_alive)
            except sqlite3.Error as ex:  # the first write: a full disk shows here, before any work
                raise statedir.full_error(self.state_dir, ex) or StateDirError(
                    f"cannot use state database {self.state_dir / statedir.DB_NAME}: {ex}; {statedir.HINT}") from None
            statedir.remove_stale_sockets(self.state_dir / "sock", _pid_alive)
            address = self._serve(listen, token)
            if listen is not None:
                self._lock.record(f"pid {os.getpid()} on {address}")
        except BaseException:
            if self.store is not None:
                self.store.close()
                self.store = None
            self._lock.release()
            raise
        self._stop_renewing.clear()
        self._renewer = threading.Thread(target=self._renew_loop, name="sitebackup-lease-renewer", daemon=True)
        self._renewer.start()
        return address

    def _serve(self, listen: str | None, token: str | None) -> str:
        assert self.store is not None
        # Over TCP the workers are other processes (their stream closing may mean they died); on the
        # private socket they are this process's own.
        self._servicer = Servicer(self.store, self.owner, self.lease_seconds, self.damage,
                                  remote_workers=listen is not None, ping_seconds=self.ping_seconds)
        # Requests over the SDK's own 4 MiB bound are refused before anything is read into the store.
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="sitebackup-backend"),
            interceptors=[Guard(self.damage, token if listen is not None else None)],
            options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", MAX_MESSAGE)])
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
            self._servicer.close()
            raise StateDirError(f"cannot listen on {listen or self._socket_path}: {ex}") from None
        if self._socket_path is not None:
            os.chmod(self._socket_path, 0o600)
        self._server = server
        return address

    def stop(self) -> None:
        if self._server is None:
            return
        assert self._servicer is not None and self.store is not None
        try:
            self._servicer.shutdown()
            self._server.stop(grace=2).wait()
            self._servicer.close()
            self._stop_renewing.set()
            if self._renewer is not None:
                self._renewer.join()
            if self.damage.message is None:  # nothing more is written to a damaged database
                with self._guarded():
                    self.store.release_leases(self.owner)
        except sqlite3.Error:  # a full disk: the next process releases them (this pid is gone by then)
            pass
        finally:
            self._server = None
            self.store.close()
            self.store = None
            self._lock.release()
            if self._socket_path is not None:
                self._socket_path.unlink(missing_ok=True)
                if self._socket_dir_is_temp:
                    self._socket_path.parent.rmdir()
                self._socket_path = None

    def host_only(self, instance_id: str) -> None:
        """This process's workers take the work of *instance_id* (and of those named before) only
        (``Servicer.host_only``)."""
        if self._servicer is not None:
            self._servicer.host_only(instance_id)

    def drop_results(self) -> None:
        """This process stops at once: what its workers report from now on is dropped (``Servicer.drop_results``)."""
        if self._servicer is not None:
            self._servicer.drop_results()

    def worker_attached(self, instance_id: str, taskhub: str = DEFAULT_TASKHUB) -> bool:
        """True when a live process holds a lease on the instance's work or has a work-item stream open."""
        store = self.store or self._open_store()
        try:
            with self._guarded():
                store.release_dead_owners(socket.gethostname(), _pid_alive)
                return store.worker_attached(taskhub, instance_id, self.lease_seconds)
        finally:
            if store is not self.store:
                store.close()

    # --- internals ------------------------------------------------------------------

    @contextmanager
    def _guarded(self) -> Iterator[None]:
        """Turn a damaged database met by this process into the one-line error (``StateDirError``)."""
        if self.damage.message is not None:
            raise StateDirError(self.damage.message)
        try:
            yield
        except sqlite3.DatabaseError as ex:
            if not statedir.is_corrupt(ex):
                raise
            raise StateDirError(self.damage.note(ex)) from None

    def _open_store(self) -> Store:
        db_path = statedir.database(self.state_dir, SCHEMA)
        try:
            return Store(db_path, on_fault=self.record_fault)
        except sqlite3.DatabaseError as ex:
            if statedir.is_corrupt(ex):
                raise statedir.corrupt_error(db_path, str(ex)) from None
            raise statedir.full_error(self.state_dir, ex) or \
                StateDirError(f"cannot use state database {db_path}: {ex}; {statedir.HINT}") from None

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
            except Exception as ex:  # a busy or briefly unavailable database must not kill renewal
                if statedir.is_corrupt(ex):
                    self.damage.note(ex)
                    return
