"""HPACK (RFC 7541), the header compression of HTTP/2: a decoder for request header blocks
and an encoder for the few response header shapes gRPC needs.

The decoder keeps the connection's dynamic table. A gRPC client repeats the same header
block, call after call, once its headers are in that table (every field one indexed byte);
a block that inserts nothing decodes to the same headers while the table is unchanged, so
such blocks are kept and found again by their bytes. The encoder never indexes: responses
are a status, a content type and trailers, written as literals (and a static index).
Huffman-coded strings are decoded by the ``hpack`` package's table.
"""

from __future__ import annotations

from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

__all__ = ["HeaderDecoder", "HpackError", "decode_integer", "encode_headers"]

Header = tuple[str, str]

_STATIC: tuple[tuple[bytes, bytes], ...] = tuple(HeaderTable.STATIC_TABLE)
"""RFC 7541 Appendix A: entries 1-61."""
_STATIC_TEXT: tuple[Header, ...] = tuple((n.decode(), v.decode()) for n, v in _STATIC)
_STATIC_NAMES = {name.decode(): i + 1 for i, (name, _) in reversed(list(enumerate(_STATIC)))}
_ENTRY_OVERHEAD = 32  # RFC 7541 4.1
_CACHED_BLOCKS = 64

_FIRST_BLOCKS: dict[tuple[int, int, bytes], tuple[list[Header], tuple[Header, ...], int, int]] = {}
"""A connection's first header block, decoded once for every connection that sends the same
bytes to the same limits (from an empty table, the same bytes decode the same way): the
headers, then the table it leaves (entries, size used, size allowed). A crowd of new
connections from one client library sends one block; its Huffman strings took ~29 us each
to decode, in the turn that reads the whole crowd."""


class HpackError(ValueError):
    """A header block that does not decode: a connection error (COMPRESSION_ERROR)."""


class HeaderDecoder:
    """One connection's request-side HPACK state."""

    def __init__(self, max_table_size: int = 4096, max_header_list_size: int = 65536) -> None:
        self.max_table_size = max_table_size
        """What this side allows (SETTINGS_HEADER_TABLE_SIZE); updates may not exceed it."""
        self.max_header_list_size = max_header_list_size
        self._table_size = max_table_size
        self._entries: list[Header] = []  # newest first
        self._used = 0
        self._cache: dict[bytes, list[Header]] = {}
        self._fresh = True  # no block decoded yet: the table is as it started

    def decode(self, block: bytes) -> list[Header]:
        cached = self._cache.get(block)
        if cached is not None:
            return cached
        if self._fresh:
            return self._decode_first(block)
        headers, changed = self._decode(block)
        if changed:
            self._cache.clear()  # the table moved: indexes name other entries now
        elif len(self._cache) < _CACHED_BLOCKS:
            self._cache[block] = headers
        return headers

    def _decode_first(self, block: bytes) -> list[Header]:
        self._fresh = False
        key = (self.max_table_size, self.max_header_list_size, block)
        known = _FIRST_BLOCKS.get(key)
        if known is not None:
            headers, entries, self._used, self._table_size = known
            self._entries = list(entries)
            return headers
        headers, _ = self._decode(block)
        if len(_FIRST_BLOCKS) >= _CACHED_BLOCKS:
            del _FIRST_BLOCKS[next(iter(_FIRST_BLOCKS))]  # the oldest: clients come and go
        _FIRST_BLOCKS[key] = (headers, tuple(self._entries), self._used, self._table_size)
        return headers

    def _decode(self, block: bytes) -> tuple[list[Header], bool]:
        headers: list[Header] = []
        changed = False
        size = 0
        i, end = 0, len(block)
        while i < end:
            first = block[i]
            if first & 0x80:  # indexed field
                index, i = decode_integer(block, i, 7)
                header = self._entry(index)
            elif first & 0x40:  # literal, added to the table
                header, i = self._literal(block, i, 6)
                self._insert(header)
                changed = True
            elif first & 0x20:  # dynamic table size update
                new_size, i = decode_integer(block, i, 5)
                if new_size > self.max_table_size:
                    raise HpackError(f"table size {new_size} above {self.max_table_size}")
                self._table_size = new_size
                self._evict(0)
                changed = True
                continue
            else:  # literal without indexing (0000) or never indexed (0001)
                header, i = self._literal(block, i, 4)
            size += len(header[0]) + len(header[1]) + _ENTRY_OVERHEAD
            if size > self.max_header_list_size:
                raise HpackError(f"header list above {self.max_header_list_size} bytes")
            headers.append(header)
        return headers, changed

    def _entry(self, index: int) -> Header:
        if 0 < index <= len(_STATIC_TEXT):
            return _STATIC_TEXT[index - 1]
        dynamic = index - len(_STATIC_TEXT) - 1
        if 0 <= dynamic < len(self._entries):
            return self._entries[dynamic]
        raise HpackError(f"header index {index} is not in the table")

    def _literal(self, block: bytes, i: int, prefix: int) -> tuple[Header, int]:
        index, i = decode_integer(block, i, prefix)
        if index:
            name = self._entry(index)[0]
        else:
            name, i = _string(block, i)
        value, i = _string(block, i)
        return (name, value), i

    def _insert(self, header: Header) -> None:
        size = len(header[0]) + len(header[1]) + _ENTRY_OVERHEAD
        if size > self._table_size:  # RFC 7541 4.4: empties the table, adds nothing
            self._entries.clear()
            self._used = 0
            return
        self._evict(size)
        self._entries.insert(0, header)
        self._used += size

    def _evict(self, room: int) -> None:
        while self._entries and self._used + room > self._table_size:
            name, value = self._entries.pop()
            self._used -= len(name) + len(value) + _ENTRY_OVERHEAD


def decode_integer(block: bytes, i: int, prefix: int) -> tuple[int, int]:
    """RFC 7541 5.1: an integer in the low ``prefix`` bits of ``block[i]``, continued in
    7-bit groups; and the index after it."""
    if i >= len(block):
        raise HpackError("header block ends inside an integer")
    mask = (1 << prefix) - 1
    value = block[i] & mask
    i += 1
    if value < mask:
        return value, i
    shift = 0
    while True:
        if i >= len(block) or shift > 28:
            raise HpackError("header block integer is cut short or too large")
        byte = block[i]
        i += 1
        value += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i


def _string(block: bytes, i: int) -> tuple[str, int]:
    if i >= len(block):
        raise HpackError("header block ends before a string")
    huffman = block[i] & 0x80
    length, i = decode_integer(block, i, 7)
    end = i + length
    if end > len(block):
        raise HpackError("header block ends inside a string")
    raw = block[i:end]
    if huffman:
        try:
            raw = decode_huffman(raw)
        except Exception as exc:  # hpack raises its own HPACKDecodingError
            raise HpackError(f"bad Huffman string: {exc}") from None
    return raw.decode("latin-1"), end  # latin-1 decodes any byte


def _encode_integer(value: int, prefix: int, flags: int) -> bytes:
    mask = (1 << prefix) - 1
    if value < mask:
        return bytes([flags | value])
    out = bytearray([flags | mask])
    value -= mask
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _encode_string(text: str) -> bytes:
    raw = text.encode("latin-1", "replace")
    return _encode_integer(len(raw), 7, 0) + raw


_STATUS_200 = b"\x88"  # static entry 8, ":status: 200"


def encode_headers(headers: list[Header]) -> bytes:
    """A header block of literals that never touch the peer's table (RFC 7541 6.2.2);
    a name from the static table by its index. ``:status: 200`` is one byte."""
    out = bytearray()
    for name, value in headers:
        if name == ":status" and value == "200":
            out += _STATUS_200
            continue
        index = _STATIC_NAMES.get(name)
        if index is not None:
            out += _encode_integer(index, 4, 0)
        else:
            out += b"\x00" + _encode_string(name)
        out += _encode_string(value)
    return bytes(out)
