"""W3C trace context: parsing ``traceparent``, continuing a trace, starting one."""

from __future__ import annotations

import pytest

from turnout_contract.trace import TraceContext, parse_traceparent

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (f"00-{TRACE}-{PARENT}-01", (int(TRACE, 16), int(PARENT, 16), 1)),
        (f" 00-{TRACE}-{PARENT}-00 ", (int(TRACE, 16), int(PARENT, 16), 0)),
        # A later version may append fields; version 00 may not.
        (f"01-{TRACE}-{PARENT}-01-extra", (int(TRACE, 16), int(PARENT, 16), 1)),
        (f"00-{TRACE}-{PARENT}-01-extra", None),
        (f"00-{TRACE.upper()}-{PARENT}-00", None),  # W3C: lowercase hex only
        (None, None),
        ("", None),
        ("garbage", None),
        (f"00-{'0' * 32}-{PARENT}-01", None),
        (f"00-{TRACE}-{'0' * 16}-01", None),
        (f"ff-{TRACE}-{PARENT}-01", None),
        (f"00-{TRACE[:-1]}-{PARENT}-01", None),
    ],
)
def test_parse_traceparent(header: str | None, expected: tuple[int, int, int] | None) -> None:
    assert parse_traceparent(header) == expected


def test_a_valid_traceparent_is_continued_with_a_new_span() -> None:
    trace = TraceContext.start(f"00-{TRACE}-{PARENT}-01", "vendor=abc")
    assert f"{trace.trace_id:032x}" == TRACE
    assert trace.parent_span_id == int(PARENT, 16)
    assert trace.span_id not in (0, int(PARENT, 16))
    assert trace.flags == 1 and trace.state == "vendor=abc"
    answer = trace.traceparent()
    assert answer == f"00-{TRACE}-{trace.span_id:016x}-01"
    assert parse_traceparent(answer) == (trace.trace_id, trace.span_id, 1)


def test_without_a_valid_traceparent_a_new_trace_starts() -> None:
    first, second = TraceContext.start(None), TraceContext.start("00-nonsense")
    for trace in (first, second):
        assert trace.trace_id and trace.span_id and trace.parent_span_id == 0
        assert trace.state == ""
        assert parse_traceparent(trace.traceparent()) == (trace.trace_id, trace.span_id, 0)
    assert first.trace_id != second.trace_id


def test_tracestate_is_dropped_without_a_parent_or_when_too_long() -> None:
    assert TraceContext.start(None, "vendor=abc").state == ""
    assert TraceContext.start(f"00-{TRACE}-{PARENT}-01", "v=" + "x" * 600).state == ""


def test_a_child_span_shares_the_trace() -> None:
    trace = TraceContext.start(f"00-{TRACE}-{PARENT}-01")
    child = trace.child()
    assert child.trace_id == trace.trace_id
    assert child.parent_span_id == trace.span_id
    assert child.span_id != trace.span_id
