"""The health edge over a real notify socket: what systemd would receive."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmtelemetryd.health import Health


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket where systemd's would be; NOTIFY_SOCKET names it."""
    path = tmp_path / "notify"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    server.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield server
    server.close()


def test_a_status_with_an_error_from_ssh_stays_one_line(notify_socket: socket.socket) -> None:
    error = "cannot connect: @@@@@\r\nWATCHDOG=1\r\nMAINPID=1\nHost key verification failed.\r\n"
    Health(None).status(f"0 VMs, no poll yet, error: {error}", alive=False)
    message = notify_socket.recv(4096).decode()
    assert message.count("\n") == 0 and message.startswith("STATUS=0 VMs"), message
    assert message.endswith("Host key verification failed.")
    assert os.environ["NOTIFY_SOCKET"]


def test_ready_and_a_watchdog_ping_are_their_own_lines(notify_socket: socket.socket) -> None:
    health = Health(None)
    health.ready("4 VMs\nREADY=0")
    assert notify_socket.recv(4096).decode() == "READY=1\nSTATUS=4 VMs READY=0"
    health.status("4 VMs", alive=True)
    assert notify_socket.recv(4096).decode() == "STATUS=4 VMs\nWATCHDOG=1"
