"""Where the gateway and its sidecar meet: the state directory and the record socket.

Every gateway of one deployment on a machine shares a state directory (``TURNOUT_STATE_DIR``,
default ``$XDG_STATE_HOME/turnout``); by default the sidecar listens on ``monitor.sock`` in
it, where the gateway sends its records, and keeps its reference profiles there too. A
supervised sidecar is told the gateway's directory with ``TURNOUT_MONITOR_STATE_DIR``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

__all__ = [
    "ADDRESS_FILE",
    "MONITOR_STATE_DIR_ENV",
    "SOCKET_NAME",
    "STATE_DIR_ENV",
    "default_state_dir",
    "gateway_state_dir",
    "socket_address",
    "socket_path",
]

STATE_DIR_ENV: Final = "TURNOUT_STATE_DIR"
"""The gateway's state directory (its ``state_dir`` setting)."""
MONITOR_STATE_DIR_ENV: Final = "TURNOUT_MONITOR_STATE_DIR"
"""The sidecar's ``state_dir`` setting: the gateway sets it for the sidecar it supervises."""
SOCKET_NAME: Final = "monitor.sock"
ADDRESS_FILE: Final = "gateway.json"
"""The running gateway's addresses in its state dir: ``http``, ``grpc``, ``monitor`` (the
sidecar's HTTP address), ``pid``; the CLI of either process finds them there."""
_UNIX: Final = "unix://"


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/turnout`` (``~/.local/state/turnout``)."""
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "turnout"


def gateway_state_dir() -> Path:
    """The gateway's state directory as another process sees it: ``TURNOUT_STATE_DIR``, else
    the default."""
    configured = os.environ.get(STATE_DIR_ENV)
    return Path(configured) if configured else default_state_dir()


def socket_address(state_dir: Path) -> str:
    """The default record socket of a state directory, as a ``unix:///path`` address."""
    return f"{_UNIX}{state_dir / SOCKET_NAME}"


def socket_path(address: str) -> Path:
    """The file of a ``unix:///path`` address; ValueError for anything else."""
    if not address.startswith(_UNIX) or len(address) == len(_UNIX):
        raise ValueError(f"{address!r} is not a unix:///path address")
    return Path(address[len(_UNIX) :])
