"""The fast tier keeps out what starts processes: tests with a process fixture or the ``processes`` mark are
deselected, and the guard of a fast run fails a process start, a name lookup or a connection beyond loopback,
while loopback connections still work."""

from __future__ import annotations

import socket
import subprocess
from types import SimpleNamespace

import fast_tier
import pytest


def item(fixtures: list[str], marked: bool = False) -> SimpleNamespace:
    return SimpleNamespace(fixturenames=fixtures,
                           get_closest_marker=lambda name: object() if marked and name == "processes" else None)


def test_process_fixtures_and_the_mark_leave_the_fast_tier():
    assert fast_tier.starts_processes(item(["tmp_path", "azurite", "cli"]))
    assert fast_tier.starts_processes(item(["tmp_path", "mount_point"]))
    assert fast_tier.starts_processes(item(["tmp_path"], marked=True))
    assert not fast_tier.starts_processes(item(["tmp_path", "monkeypatch"]))


def test_the_guard_fails_processes_and_the_network_beyond_loopback_but_not_loopback():
    with socket.create_server(("127.0.0.1", 0)) as server, pytest.MonkeyPatch.context() as patch:
        attempts = fast_tier.guard(patch)
        with pytest.raises(pytest.fail.Exception, match="started a process"):
            subprocess.run(["true"])
        with pytest.raises(pytest.fail.Exception, match="beyond loopback"):
            socket.create_connection(("192.0.2.1", 9), timeout=1)  # TEST-NET-1: refused before any packet
        with pytest.raises(pytest.fail.Exception, match="looked up a name"):
            socket.getaddrinfo("example.invalid", 80)
        with socket.create_connection(server.getsockname(), timeout=5):
            pass
        assert len(attempts) == 3
