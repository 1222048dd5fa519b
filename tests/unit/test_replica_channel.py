"""The same-node channel to Ray replicas, without Ray: the frame format, and the gateway's
channel against a replica's real Unix socket serving a real ONNX Runtime session."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from model_zoo import add_sub

from gateway.backends import _wire
from gateway.backends._onnx import OnnxSession
from gateway.backends._ray_replica import ReplicaSocket
from gateway.backends.channel import ChannelBroken, Channels, channel_dir
from gateway.errors import BackendError

META = {"replica": "node/1", "device": "cpu"}


def _roundtrip(tensors: dict[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
    frame = b"".join(bytes(part) for part in _wire.encode({"k": 1}, tensors))
    meta_bytes, payload_bytes = _wire.lengths(frame[: _wire.HEADER.size])
    meta_end = _wire.HEADER.size + meta_bytes
    assert len(frame) == meta_end + payload_bytes
    meta, decoded = _wire.decode(frame[_wire.HEADER.size : meta_end], frame[meta_end:])
    assert meta == {"k": 1}
    return decoded


@pytest.mark.parametrize(
    "value",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.arange(6, dtype=np.int64).reshape(2, 3),
        np.array([[True, False]]),
        np.arange(4, dtype=np.float16),
        np.arange(4, dtype=np.float32).astype(ml_dtypes.bfloat16),
        np.zeros((0, 4), np.float32),
        np.array(3.5, np.float64),
        np.arange(20, dtype=np.int32).reshape(4, 5)[:, ::2],  # not contiguous
    ],
)
def test_tensors_come_back_with_their_dtype_shape_and_values(value: np.ndarray[Any, Any]) -> None:
    got = _roundtrip({"x": value, "y": np.ones(2, np.uint8)})
    assert list(got) == ["x", "y"]
    assert got["x"].dtype == value.dtype
    assert got["x"].shape == value.shape
    np.testing.assert_array_equal(got["x"], value)
    np.testing.assert_array_equal(got["y"], np.ones(2, np.uint8))


def test_a_frame_that_does_not_add_up_is_refused() -> None:
    frame = b"".join(bytes(p) for p in _wire.encode({}, {"x": np.ones(4, np.float32)}))
    meta_bytes, _ = _wire.lengths(frame[: _wire.HEADER.size])
    meta = frame[_wire.HEADER.size : _wire.HEADER.size + meta_bytes]
    with pytest.raises(ValueError, match="holds 12 bytes, its tensors 16"):
        _wire.decode(meta, b"\0" * 12)
    with pytest.raises(ValueError, match="not a turnout replica frame"):
        _wire.lengths(b"HTTP" + frame[4 : _wire.HEADER.size])


def test_bytes_tensors_are_not_carried() -> None:
    assert _wire.carries({"x": np.ones(2, np.float32)})
    assert not _wire.carries({"x": np.array([b"a"], dtype=object)})


def test_socket_directories_are_short_and_apart() -> None:
    a = channel_dir("turnout", "turnout-" + "m" * 200 + "-v1")
    assert len(str(a / f"{2**22}.sock")) < 108
    assert a != channel_dir("turnout", "turnout-m-v2") != channel_dir("other", "turnout-m-v2")
    assert a.parent.name == f"turnout-{os.getuid()}"


# -- a replica's socket, served by a real ONNX Runtime session ---------------------------------


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> OnnxSession:
    path = tmp_path_factory.mktemp("channel") / "model.onnx"
    add_sub(path)
    return OnnxSession(str(path))


@pytest.fixture
def directory() -> Iterator[Path]:
    # Not tmp_path: a Unix socket path must stay under 108 bytes.
    path = channel_dir("tests", f"channel-{os.getpid()}-{id(object())}")
    yield path
    for leftover in path.glob("*") if path.exists() else []:
        leftover.unlink()
    if path.exists():
        path.rmdir()


@pytest.fixture
def replica(directory: Path, session: OnnxSession) -> Iterator[ReplicaSocket]:
    opened = ReplicaSocket.open(directory, session, META)
    assert opened is not None
    yield opened
    opened.close()


def _batch(rows: int) -> dict[str, np.ndarray[Any, Any]]:
    a = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)
    return {"a": a, "b": np.full((rows, 4), 2.0, np.float32)}


async def test_a_batch_runs_on_the_replica_and_names_it(
    replica: ReplicaSocket, directory: Path
) -> None:
    channels = Channels(directory, per_replica=2)
    channel = channels.pick()
    assert channel is not None and channel.path == replica.path
    assert oct(directory.stat().st_mode & 0o777) == "0o700"
    assert oct(replica.path.stat().st_mode & 0o777) == "0o600"
    inputs = _batch(3)
    outputs, identity, device = await channel.call(inputs)
    assert (identity, device) == ("node/1", "cpu")
    np.testing.assert_array_equal(outputs["sum"], inputs["a"] + 2)
    np.testing.assert_array_equal(outputs["diff"], inputs["a"] - 2)
    channels.close()


async def test_batches_in_flight_together_each_get_their_own_answer(
    replica: ReplicaSocket, directory: Path
) -> None:
    channels = Channels(directory, per_replica=4)
    channel = channels.pick()
    assert channel is not None
    batches = [_batch(rows) for rows in (1, 2, 3, 4, 5, 6)]
    replies = await asyncio.gather(*(channel.call(b) for b in batches))
    for inputs, (outputs, _, _) in zip(batches, replies, strict=True):
        np.testing.assert_array_equal(outputs["sum"], inputs["a"] + 2)
    assert channel.inflight == 0
    channels.close()


async def test_a_failed_run_is_a_backend_error_and_the_connection_stays_usable(
    replica: ReplicaSocket, directory: Path
) -> None:
    channel = Channels(directory, per_replica=1).pick()
    assert channel is not None
    with pytest.raises(BackendError, match="ONNX Runtime failed"):
        await channel.call({"a": np.ones((1, 4), np.float32)})  # input 'b' is missing
    outputs, _, _ = await channel.call(_batch(1))
    assert outputs["sum"].shape == (1, 4)
    assert not channel.broken


async def test_a_replica_that_stopped_breaks_the_channel_and_is_dropped(
    replica: ReplicaSocket, directory: Path
) -> None:
    channels = Channels(directory, per_replica=1)
    channel = channels.pick()
    assert channel is not None
    await channel.call(_batch(1))  # an idle connection is kept
    replica.close()
    with pytest.raises(ChannelBroken):
        await channel.call(_batch(1))
    assert channel.broken
    channels.drop(channel)
    channels.scan()
    assert len(channels) == 0  # its socket file went with it
    assert channels.pick() is None


async def test_a_socket_left_by_a_killed_replica_is_refused_and_removed(directory: Path) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    stale = directory / "12345.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(stale))  # bound, never listening, then gone: what SIGKILL leaves
    listener.close()
    channels = Channels(directory, per_replica=1)
    channel = channels.pick()
    assert channel is not None
    with pytest.raises(ChannelBroken, match=r"12345\.sock"):
        await channel.call(_batch(1))
    assert not stale.exists()


def test_the_least_busy_replica_with_room_is_picked(directory: Path) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    for pid in (1, 2):
        (directory / f"{pid}.sock").touch()
    (directory / "notes.txt").touch()  # not a socket name: ignored
    channels = Channels(directory, per_replica=2)
    channels.scan()
    assert len(channels) == 2
    idle = [channels.pick() for _ in range(4)]
    assert len({id(c) for c in idle}) == 2  # idle replicas take turns
    first = channels.pick()
    assert first is not None
    first.inflight = 1
    second = channels.pick()
    assert second is not None and second is not first
    second.inflight = 2  # full
    assert channels.pick() is first
    first.inflight = 2
    assert channels.pick() is None  # every replica here is busy: the batch goes to Serve


def test_a_load_prunes_the_sockets_nobody_listens_on(
    replica: ReplicaSocket, directory: Path
) -> None:
    stale = directory / "12345.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(stale))
    listener.close()
    channels = Channels(directory, per_replica=1)
    channels.prune()
    assert sorted(p.name for p in directory.iterdir()) == [replica.path.name]
