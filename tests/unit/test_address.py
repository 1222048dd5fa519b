"""Where gateway and sidecar meet: socket addresses and the monitor address setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.settings import ServerSettings
from turnout_contract.address import SOCKET_NAME, socket_address, socket_path


def test_addresses() -> None:
    assert socket_path("unix:///run/turnout/monitor.sock") == Path("/run/turnout/monitor.sock")
    with pytest.raises(ValueError, match="unix:///path"):
        socket_path("tcp://127.0.0.1:9000")
    settings = ServerSettings(monitor_address="unix:///tmp/x.sock")
    assert settings.monitor and settings.monitor_sample_rows_per_s == 10000
    with pytest.raises(ValueError, match="monitor_address"):
        ServerSettings(monitor_address="127.0.0.1:9000")


def test_the_default_socket_lives_in_the_state_directory() -> None:
    address = socket_address(Path("/var/lib/turnout"))
    assert address == f"unix:///var/lib/turnout/{SOCKET_NAME}"
    assert socket_path(address) == Path("/var/lib/turnout/monitor.sock")
