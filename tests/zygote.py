"""A fork server for the suite's ``sitebackup`` processes: the real command, without paying its imports each time.

Most of what a ``sitebackup`` process costs the suite is importing its dependencies (the Azure SDK with aiohttp,
durabletask with gRPC, click, rich), the same for each of the hundreds of processes the tests start. This process
imports them once, holds no thread and no connection, and for each request forks a child that becomes the
command: it takes the caller's stdin/stdout/stderr (passed as descriptors), argv, environment, working directory
and umask, resets its signals and standard streams as a fresh interpreter would, and runs ``sitebackup/__main__``
through ``runpy`` as ``python -m sitebackup`` does; the interpreter then exits as any other (atexit, thread
joins, exit code or the signal that ended it). The caller gets the child's pid, then its wait status.

Only ``tests/helpers.run_cli`` uses it, and only for plain runs: a caller that needs the process as its own child
(signals, resource limits, another user, its peak memory) or a startup variable that acts before any import
(``PYTHON*``, the locale) gets a real ``python -m sitebackup``, as every test that starts processes with
``subprocess.Popen`` does. ``SITEBACKUP_TEST_EXEC=1`` sends every run through a real exec.

Protocol on a unix socket in a private (0700) directory: the caller sends one JSON header with the three
descriptors (SCM_RIGHTS); the server answers the child's pid, then its wait status (8-byte integers). The caller
closing its end kills the child (a timeout, a killed test).
"""

from __future__ import annotations

import atexit
import importlib
import io
import json
import locale
import os
import pkgutil
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

PRELOAD = [  # imported only while a command runs: worth having before the fork too
    "azure.storage.blob.aio", "azure.core.rest._aiohttp", "azure.core.rest._requests_basic",
    "grpc._channel", "grpc._server", "grpc.experimental", "encodings.ascii", "encodings.utf_8_sig", "runpy",
]
NUMBER = struct.Struct("q")


def preload() -> None:
    import sitebackup
    for module in pkgutil.walk_packages(sitebackup.__path__, "sitebackup."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
    for name in PRELOAD:
        importlib.import_module(name)


class Launch:
    """One request: what the child takes from its caller."""

    def __init__(self, header: dict, fds: list[int]):
        self.argv: list[str] = header["argv"]
        self.env: dict[str, str] = header["env"]
        self.cwd: str = header["cwd"]
        self.umask: int = header["umask"]
        self.fds = fds

    def become(self) -> None:
        """In the child: take the caller's place (descriptors, directory, environment) as exec would."""
        for target, fd in enumerate(self.fds):
            os.dup2(fd, target)
        for fd in self.fds:
            if fd > 2:
                os.close(fd)
        os.chdir(self.cwd)
        os.environ.clear()
        os.environ.update(self.env)
        os.umask(self.umask)
        time.tzset()
        for number in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
                       signal.SIGCHLD, signal.SIGALRM):
            signal.signal(number, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        unbuffered = bool(self.env.get("PYTHONUNBUFFERED"))
        streams = []
        for fd, mode, errors in ((0, "rb", sys.stdin.errors), (1, "wb", sys.stdout.errors),
                                 (2, "wb", sys.stderr.errors)):
            binary = io.open(fd, mode, buffering=0 if unbuffered and fd else -1, closefd=False)
            streams.append(io.TextIOWrapper(binary, encoding=sys.stdout.encoding, errors=errors,
                                            line_buffering=fd == 2 or (fd == 1 and os.isatty(1)),
                                            write_through=unbuffered and fd > 0))
        sys.stdin, sys.stdout, sys.stderr = streams
        sys.__stdin__, sys.__stdout__, sys.__stderr__ = streams
        sys.argv = ["-m", *self.argv]
        sys.path[0] = self.cwd


def receive(conn: socket.socket) -> Launch:
    data, fds, _flags, _addr = socket.recv_fds(conn, 1 << 20, 3)
    while not data.endswith(b"\n"):
        more = conn.recv(1 << 20)
        if not more:
            raise EOFError
        data += more
    return Launch(json.loads(data), fds)


def serve(path: str) -> Launch:
    """Answer requests until told to stop; returns only in a child, which then runs the command."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(64)
    children: dict[int, tuple[int, socket.socket]] = {}  # pidfd -> (pid, caller)
    callers: dict[socket.socket, tuple[int, int]] = {}  # caller -> (pid, pidfd)
    while True:
        ready, _, _ = select.select([listener, *callers, *children], [], [])
        for item in ready:
            if item is listener:
                conn, _ = listener.accept()
                try:
                    launch = receive(conn)
                except (OSError, ValueError, EOFError):
                    conn.close()
                    continue
                pid = os.fork()
                if pid == 0:
                    listener.close()
                    conn.close()
                    for other, (_pid, pidfd) in callers.items():
                        other.close()
                        os.close(pidfd)
                    launch.become()
                    return launch
                for fd in launch.fds:
                    os.close(fd)
                pidfd = os.pidfd_open(pid)
                children[pidfd] = (pid, conn)
                callers[conn] = (pid, pidfd)
                conn.sendall(NUMBER.pack(pid))
            elif isinstance(item, socket.socket):  # the caller went away (timeout, killed test): so does its run
                if item not in callers:  # its child was reaped earlier in this round: nothing left to stop
                    continue
                pid, _pidfd = callers[item]
                try:
                    item.recv(1)
                except OSError:
                    pass
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                callers.pop(item)
            else:
                pid, conn = children.pop(item)
                _, status = os.waitpid(pid, 0)
                os.close(item)
                if conn in callers:
                    callers.pop(conn)
                    try:
                        conn.sendall(NUMBER.pack(status))
                    except OSError:
                        pass
                conn.close()


STARTUP = ("PYTHON", "LC_", "LANG")  # read by the interpreter before any import: a fork cannot honour a change
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Server:
    """The caller's side: the server, started on first use and stopped with the test process."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.path = ""
        self.broken = False
        self.last_pid = 0  # the child of the latest run, for the test that checks a timed-out one is gone

    def fits(self, env: dict[str, str]) -> bool:
        if os.environ.get("SITEBACKUP_TEST_EXEC") == "1" or self.broken:
            return False

        def startup(variables: dict[str, str]) -> dict[str, str]:
            return {k: v for k, v in variables.items() if k.startswith(STARTUP) and k != "PYTHONUNBUFFERED"}
        return startup(env) == startup(dict(os.environ))

    def start(self) -> None:
        where = tempfile.mkdtemp(prefix="sbz-")  # 0700: no other user reaches the socket
        self.path = os.path.join(where, "socket")
        with open(os.path.join(where, "log"), "wb") as log:
            self.process = subprocess.Popen([sys.executable, os.path.abspath(__file__), self.path], cwd=ROOT,
                                            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                            start_new_session=True)
        atexit.register(self.stop)
        deadline = time.monotonic() + 60
        while not os.path.exists(self.path):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.broken = True
                raise RuntimeError(f"the fork server did not start; see {where}/log")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.path:
            shutil.rmtree(os.path.dirname(self.path), ignore_errors=True)

    def run(self, args: list[str], env: dict[str, str], cwd: str | os.PathLike,
            timeout: float) -> subprocess.CompletedProcess:
        if self.process is None:
            self.start()
        argv = [sys.executable, "-m", "sitebackup", *args]
        header = json.dumps({"argv": list(args), "env": env, "cwd": os.path.abspath(cwd),
                             "umask": current_umask()}).encode() + b"\n"
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        stdin = os.open(os.devnull, os.O_RDONLY)
        try:
            os.fstat(0)
            os.dup2(0, stdin)  # the caller's stdin, as subprocess.run gives it
        except OSError:
            pass
        sock = socket.socket(socket.AF_UNIX)
        try:
            sock.connect(self.path)
            socket.send_fds(sock, [header], [stdin, out_w, err_w])
        finally:
            for fd in (stdin, out_w, err_w):
                os.close(fd)
        chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}
        answer = b""
        deadline = time.monotonic() + timeout
        self.last_pid = 0
        try:
            while len(answer) < 16 or not (done(chunks[out_r]) and done(chunks[err_r])):
                left = deadline - time.monotonic()
                if left <= 0:
                    sock.close()  # the server kills the child
                    raise subprocess.TimeoutExpired(argv, timeout, joined(chunks[out_r]), joined(chunks[err_r]))
                waiting = [fd for fd in (out_r, err_r) if not done(chunks[fd])] + ([sock] if len(answer) < 16 else [])
                ready, _, _ = select.select(waiting, [], [], left)
                for item in ready:
                    if item is sock:
                        more = sock.recv(16 - len(answer))
                        if not more:
                            self.broken = True
                            raise RuntimeError("the fork server went away")
                        answer += more
                        if len(answer) >= 8 and not self.last_pid:
                            self.last_pid = NUMBER.unpack(answer[:8])[0]
                    else:
                        chunks[item].append(os.read(item, 1 << 16))
        finally:
            sock.close()
            os.close(out_r)
            os.close(err_r)
        status = NUMBER.unpack(answer[8:16])[0]
        return subprocess.CompletedProcess(argv, os.waitstatus_to_exitcode(status), text(joined(chunks[out_r])),
                                           text(joined(chunks[err_r])))


def done(chunks: list[bytes]) -> bool:
    return bool(chunks) and chunks[-1] == b""


def joined(chunks: list[bytes]) -> bytes:
    return b"".join(chunks)


def text(data: bytes) -> str:
    """As ``subprocess.run(text=True)`` decodes."""
    return data.decode(locale.getencoding()).replace("\r\n", "\n").replace("\r", "\n")


def current_umask() -> int:
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


SERVER = Server()


if __name__ == "__main__":
    sys.path[0] = ROOT  # as `python -m sitebackup` run from the checkout finds it
    preload()
    serve(sys.argv[1])
    import runpy
    runpy.run_module("sitebackup", run_name="__main__", alter_sys=True)
