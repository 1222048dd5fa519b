"""The frame a batch travels in between the gateway and a replica on the same node.

One frame: a fixed header (magic, length of the metadata, length of the payload), JSON
metadata naming each tensor's dtype and shape, then the tensors' bytes back to back. No
pickling: numpy views the payload where it lies. Imported by Ray replicas, so it depends
only on numpy (and ml_dtypes for bfloat16).
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

import ml_dtypes
import numpy as np

__all__ = ["HEADER", "Frame", "carries", "decode", "encode", "lengths", "receive", "send"]

Tensors = dict[str, np.ndarray[Any, Any]]
Frame = list[bytes | memoryview]

MAGIC = b"TNT1"
HEADER = struct.Struct("<4sII")
"""Magic, metadata bytes, payload bytes."""
MAX_META_BYTES = 1 << 20
_BF16 = np.dtype(ml_dtypes.bfloat16)


def carries(tensors: Tensors) -> bool:
    """Whether every tensor has a fixed-size dtype (BYTES tensors hold Python objects)."""
    return not any(value.dtype.hasobject for value in tensors.values())


def _dtype(name: str) -> np.dtype[Any]:
    return _BF16 if name == "bfloat16" else np.dtype(name)


def encode(meta: dict[str, Any], tensors: Tensors) -> Frame:
    """Header and metadata in one buffer, then one buffer per non-empty tensor (no copy of
    a contiguous array)."""
    # Not np.ascontiguousarray: it turns a 0-d array into a 1-d one.
    arrays = [v if v.flags.c_contiguous else v.copy(order="C") for v in tensors.values()]
    described = {
        **meta,
        "t": [[name, a.dtype.name, list(a.shape)] for name, a in zip(tensors, arrays, strict=True)],
    }
    head = json.dumps(described, separators=(",", ":")).encode()
    payload = sum(a.nbytes for a in arrays)
    frame: Frame = [HEADER.pack(MAGIC, len(head), payload) + head]
    frame.extend(a.reshape(-1).view(np.uint8).data for a in arrays if a.nbytes)
    return frame


def lengths(header: bytes) -> tuple[int, int]:
    """(metadata, payload) byte counts of a frame's header; ValueError if it is not one."""
    magic, meta_bytes, payload_bytes = HEADER.unpack(header)
    if magic != MAGIC or meta_bytes > MAX_META_BYTES:
        raise ValueError("not a turnout replica frame")
    return meta_bytes, payload_bytes


def decode(meta_bytes: bytes, payload: bytes | bytearray) -> tuple[dict[str, Any], Tensors]:
    """The metadata and the tensors it describes, as views on ``payload``."""
    meta: dict[str, Any] = json.loads(meta_bytes)
    described = [
        (name, _dtype(dtype_name), shape, int(np.prod(shape, dtype=np.int64)))
        for name, dtype_name, shape in meta.pop("t")
    ]
    size = sum(count * dtype.itemsize for _, dtype, _, count in described)
    if size != len(payload):
        raise ValueError(f"frame payload holds {len(payload)} bytes, its tensors {size}")
    tensors: Tensors = {}
    offset = 0
    for name, dtype, shape, count in described:
        tensors[name] = np.frombuffer(payload, dtype, count, offset).reshape(shape)
        offset += count * dtype.itemsize
    return meta, tensors


def _receive_exactly(sock: socket.socket, size: int) -> bytearray | None:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            return None
        got += n
    return buffer


def receive(sock: socket.socket) -> tuple[dict[str, Any], Tensors] | None:
    """One frame from a blocking socket; None when the peer closed between frames."""
    header = _receive_exactly(sock, HEADER.size)
    if header is None:
        return None
    meta_bytes, payload_bytes = lengths(bytes(header))
    meta = _receive_exactly(sock, meta_bytes)
    payload = _receive_exactly(sock, payload_bytes)
    if meta is None or payload is None:
        return None
    return decode(bytes(meta), payload)


def send(sock: socket.socket, frame: Frame) -> None:
    for buffer in frame:
        sock.sendall(buffer)
