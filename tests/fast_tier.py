"""The fast tier (``pytest --fast``): which tests belong to it, and a guard that fails any that start a process
or reach the network beyond loopback.

A test leaves the fast tier when its fixture closure holds a fixture that starts something (Azurite, a mount)
or when it is marked ``processes``; a test that starts a process without either fails in a fast run, so it
cannot sit in the fast tier unnoticed.
"""

from __future__ import annotations

import _posixsubprocess
import ipaddress
import os
import platform
import socket
import subprocess

import pytest

# fixtures that start processes; anything depending on them (blob_service, cli_env, cli) has them in its closure
PROCESS_FIXTURES = frozenset({"azurite", "mount_point"})

# every way a test (or code under it, in any thread) could start a process: the Popen and multiprocessing
# paths end in one of these
_PROCESS_STARTERS = [
    (subprocess.Popen, "_execute_child"),
    (_posixsubprocess, "fork_exec"),
    (os, "fork"), (os, "forkpty"), (os, "posix_spawn"), (os, "posix_spawnp"), (os, "system"),
    (os, "execv"), (os, "execve"), (os, "execvp"), (os, "execvpe"),
]


def starts_processes(item: pytest.Item) -> bool:
    return item.get_closest_marker("processes") is not None or not PROCESS_FIXTURES.isdisjoint(
        getattr(item, "fixturenames", ()))


def select(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect, in a fast run, every test that starts processes."""
    # the interpreter asks `uname -p` once, the first time anything (the Azure SDK's user agent) reads
    # platform.uname(); asked here, before any guard, it is no test's process
    platform.processor()
    dropped = [item for item in items if starts_processes(item)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if not starts_processes(item)]


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return None


def _is_loopback(host: str) -> bool:
    ip = _ip(host)
    return host == "localhost" or (ip is not None and ip.is_loopback)


def guard(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Refuse process starts, name lookups and connections beyond loopback until ``monkeypatch`` is undone.
    Each attempt fails the test where it happens and is listed in the returned list, so the caller can fail
    the test again at teardown when the code under test caught the failure."""
    attempts: list[str] = []

    def refuse(what: str) -> None:
        attempts.append(what)
        pytest.fail(f"fast tier: this test {what}; give it a fixture that starts processes or mark it "
                    "@pytest.mark.processes", pytrace=False)

    for owner, name in _PROCESS_STARTERS:
        if hasattr(owner, name):
            monkeypatch.setattr(owner, name, lambda *a, _n=name, **k: refuse(f"started a process ({_n})"))

    def check(sock: socket.socket, address) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
            refuse(f"reached the network beyond loopback ({address[0]})")

    real_connect, real_connect_ex, real_sendto = socket.socket.connect, socket.socket.connect_ex, socket.socket.sendto
    real_getaddrinfo = socket.getaddrinfo

    def connect(sock, address):
        check(sock, address)
        return real_connect(sock, address)

    def connect_ex(sock, address):
        check(sock, address)
        return real_connect_ex(sock, address)

    def sendto(sock, data, *rest):
        check(sock, rest[-1])
        return real_sendto(sock, data, *rest)

    def getaddrinfo(host, *args, **kwargs):
        if isinstance(host, bytes):
            host = host.decode()
        if host and _ip(host) is None and host != "localhost":  # an address is looked up without the network
            refuse(f"looked up a name beyond loopback ({host})")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket.socket, "sendto", sendto)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return attempts
