"""HPACK as the gRPC transport decodes it: RFC 7541's own examples (Appendix C), table
eviction, bad blocks, and the encoder's blocks read back by an independent decoder."""

from __future__ import annotations

import hpack
import pytest

from gateway.grpc.hpack import _FIRST_BLOCKS, HeaderDecoder, HpackError, encode_headers

FIRST = [(":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "www.example.com")]


def test_rfc7541_c3_requests_without_huffman() -> None:
    decoder = HeaderDecoder()
    assert decoder.decode(bytes.fromhex("828684410f7777772e6578616d706c652e636f6d")) == FIRST
    second = decoder.decode(bytes.fromhex("828684be58086e6f2d6361636865"))
    assert second == [*FIRST, ("cache-control", "no-cache")]
    third = decoder.decode(
        bytes.fromhex("828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565")
    )
    assert third == [
        (":method", "GET"), (":scheme", "https"), (":path", "/index.html"),
        (":authority", "www.example.com"), ("custom-key", "custom-value"),
    ]  # fmt: skip


def test_rfc7541_c4_requests_with_huffman() -> None:
    decoder = HeaderDecoder()
    assert decoder.decode(bytes.fromhex("828684418cf1e3c2e5f23a6ba0ab90f4ff")) == FIRST
    second = decoder.decode(bytes.fromhex("828684be5886a8eb10649cbf"))
    assert second == [*FIRST, ("cache-control", "no-cache")]


def test_a_small_table_evicts_the_oldest_entries() -> None:
    """RFC 7541 C.5 sets a 256-byte table: the third response's insertions evict the first
    ones; an index past the table is an error."""
    encoder = hpack.Encoder()
    encoder.header_table_size = 256
    decoder = HeaderDecoder(max_table_size=256)
    for i in range(20):
        headers = [("x-key", f"value-{i:03d}" * 4)]
        assert decoder.decode(encoder.encode(headers)) == headers
    assert decoder._used <= 256
    with pytest.raises(HpackError, match="not in the table"):
        decoder.decode(bytes([0x80 | 0x7F, 0x7F]))  # index 254


def test_a_repeated_block_is_answered_from_the_cache_while_the_table_stands() -> None:
    encoder = hpack.Encoder()
    decoder, reference = HeaderDecoder(), hpack.Decoder()
    headers = [(":path", "/inference.GRPCInferenceService/ModelInfer"), ("te", "trailers")]
    first = encoder.encode(headers)  # inserts
    again = encoder.encode(headers)  # indexed only: the same bytes each time after this
    for block in (first, again):
        assert decoder.decode(block) == reference.decode(block) == headers
    assert decoder.decode(again) is decoder.decode(again)  # cached
    other = encoder.encode([("other", "x")])  # inserts: every dynamic index moves by one
    assert decoder.decode(other) == reference.decode(other) == [("other", "x")]
    # The same bytes name other entries now: decoded afresh, as the reference does.
    assert decoder.decode(again) == reference.decode(again) != headers


def test_connections_sending_the_same_first_block_share_its_decoding() -> None:
    """A crowd of new connections from one client sends the same first block: decoded
    once, and each connection's table is left as decoding it would leave it (the next
    block's dynamic indexes resolve alike)."""
    first = bytes.fromhex("828684418cf1e3c2e5f23a6ba0ab90f4ff")  # RFC 7541 C.4.1, inserts
    second = bytes.fromhex("828684be5886a8eb10649cbf")  # C.4.2: index 62 is C.4.1's insert
    one, two = HeaderDecoder(), HeaderDecoder()
    decoded = one.decode(first)
    assert decoded == FIRST
    assert two.decode(first) is decoded  # the first connection's decoding
    for decoder in (one, two):
        assert decoder.decode(second) == [*FIRST, ("cache-control", "no-cache")]
        assert decoder._used == one._used
    # Other limits decode afresh: the same bytes may be refused or left in another table.
    small = HeaderDecoder(max_table_size=64)
    again = small.decode(first)
    assert again == FIRST and again is not decoded


def test_the_shared_first_blocks_are_bounded_and_keep_the_newest() -> None:
    blocks = [hpack.Encoder().encode([(":authority", f"client-{i}")]) for i in range(100)]
    for block in blocks:
        HeaderDecoder().decode(block)
    assert len(_FIRST_BLOCKS) <= 64
    assert (4096, 65536, blocks[-1]) in _FIRST_BLOCKS
    assert (4096, 65536, blocks[0]) not in _FIRST_BLOCKS


@pytest.mark.parametrize(
    "block",
    [b"\x82\x3f", b"\x40\x85ab", b"\x41\x0f", b"\x3f\xe1\xff\xff\xff\xff\x0f", b"\x80"],
    ids=["cut integer", "cut string", "cut value", "table too large", "index 0"],
)
def test_bad_blocks_are_errors_not_crashes(block: bytes) -> None:
    with pytest.raises(HpackError):
        HeaderDecoder().decode(block)


def test_a_header_list_over_the_limit_is_refused() -> None:
    block = hpack.Encoder().encode([("big", "x" * 5000)])
    with pytest.raises(HpackError, match="header list"):
        HeaderDecoder(max_header_list_size=4096).decode(block)


def test_encoded_answers_decode_with_an_independent_decoder() -> None:
    headers = [
        (":status", "200"), ("content-type", "application/grpc"), ("grpc-status", "8"),
        ("grpc-message", "queue full " * 20),
        ("traceparent", "00-" + "a" * 32 + "-" + "b" * 16 + "-01"),
    ]  # fmt: skip
    assert hpack.Decoder().decode(encode_headers(headers)) == headers
    assert encode_headers([(":status", "200")]) == b"\x88"
