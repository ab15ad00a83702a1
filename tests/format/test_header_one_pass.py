"""The one-pass header reader (``struct``, no cursor) against the checked step-by-step
parser: it must read exactly what the checked parser reads, and give way to it for
anything else, so that every error is still the checked parser's own."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aioenvelope.errors import MalformedMessageError, MessageLimitError
from aioenvelope.format import AlgorithmSuite, ContentType
from aioenvelope.format import header as header_module
from aioenvelope.format._cursor import Cursor, NeedMoreData
from aioenvelope.format.encryption_context import serialize_encryption_context
from aioenvelope.format.header import (
    EncryptedDataKey,
    MessageHeader,
    ParsedHeader,
    _header_steps,
    _read_plain_v2,
    parse_header,
    serialize_header_body,
    stored_context_bytes,
)

COMMIT = AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY


def _checked(buf: bytes, max_edks: int = 10) -> ParsedHeader | Exception:
    """What the step-by-step parser makes of ``buf``: the header, or its error."""
    try:
        step = next(_header_steps(Cursor(buf), max_edks))
    except (MalformedMessageError, MessageLimitError) as exc:
        return exc
    return step if isinstance(step, ParsedHeader) else NeedMoreData()


def _header_bytes(context: dict[str, str], edks: int = 1) -> bytes:
    header = MessageHeader(
        version=2,
        algorithm_suite=COMMIT,
        message_id=os.urandom(32),
        encryption_context=context,
        encrypted_data_keys=tuple(
            EncryptedDataKey(f"p{i}", os.urandom(20), os.urandom(48)) for i in range(edks)
        ),
        content_type=ContentType.FRAMED,
        frame_length=4096,
        suite_data=os.urandom(32),
    )
    return serialize_header_body(header) + os.urandom(16)


@settings(max_examples=200, deadline=None)
@given(
    context=st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=4),
    edks=st.integers(1, 3),
    flip=st.integers(0, 10_000),
    cut=st.integers(0, 10_000),
)
def test_one_pass_reader_reads_what_the_checked_parser_reads_or_gives_way(
    context: dict[str, str], edks: int, flip: int, cut: int
) -> None:
    """Valid, corrupted and truncated headers: the one-pass reader returns the very
    header the checked parser returns, or None (and the checked parser then decides)."""
    whole = _header_bytes(context, edks)
    corrupted = bytearray(whole)
    corrupted[flip % len(whole)] ^= 0x5A
    for buf in (whole, bytes(corrupted), whole[: cut % len(whole)]):
        fast = _read_plain_v2(buf, 0, 10)
        checked = _checked(buf)
        if fast is not None:
            assert fast == checked
            assert isinstance(checked, ParsedHeader)
            assert fast.header == checked.header
    assert _read_plain_v2(whole, 0, 10) == _checked(whole)


def test_context_bytes_are_reused_only_when_they_are_the_serialization() -> None:
    """A context written out of key order (as some writers sort by UTF-16) is read, but
    its bytes are not taken for the serialization keyrings authenticate: that is
    re-made in key order."""
    ordered = serialize_encryption_context({"a": "1", "b": "2"})
    reversed_entries = b"\x00\x02" + ordered[2 + 6 :] + ordered[2 : 2 + 6]
    buf = bytearray(_header_bytes({"a": "1", "b": "2"}))
    start = 1 + 2 + 32 + 2
    assert bytes(buf[start : start + len(ordered)]) == ordered
    in_order = parse_header(bytes(buf), max_encrypted_data_keys=10).header
    assert stored_context_bytes(in_order) == ordered
    buf[start : start + len(ordered)] = reversed_entries
    out_of_order = parse_header(bytes(buf), max_encrypted_data_keys=10).header
    assert dict(out_of_order.encryption_context) == {"a": "1", "b": "2"}
    assert stored_context_bytes(out_of_order) == ordered


def test_a_context_changed_through_one_headers_view_leaves_the_next_header_alone() -> None:
    """The attack on a shared context: ``MappingProxyType`` hands its dict to the other
    operand of ``|`` (``__ror__``), which can change it. Each header's view is over its
    own copy, so the next header with the same context bytes still reads what its bytes
    say (the reproduced-context check compares against that)."""

    class Grab:
        def __ror__(self, other: dict[str, str]) -> dict[str, str]:
            other["tenant"] = "evil"
            return other

    first = _read_plain_v2(_header_bytes({"tenant": "t1"}), 0, 10)
    assert first is not None
    first.header.encryption_context | Grab()  # type: ignore[operator]
    second = _read_plain_v2(_header_bytes({"tenant": "t1"}), 0, 10)
    assert second is not None
    assert dict(second.header.encryption_context) == {"tenant": "t1"}
    with pytest.raises(TypeError):
        second.header.encryption_context["tenant"] = "b"  # type: ignore[index]


def test_context_memo_stays_bounded_under_ten_thousand_distinct_contexts() -> None:
    """A stream of headers each with its own context (per-record contexts, or an
    attacker's) empties the memo when full: it never holds more than its bound, and
    each header still reads its own context."""
    for n in range(10_000):
        read = _read_plain_v2(_header_bytes({"record": str(n)}), 0, 10)
        assert read is not None
        assert read.header.encryption_context["record"] == str(n)
        assert len(header_module._READ_CONTEXTS) <= header_module._READ_CONTEXTS_MAX


def test_a_large_context_is_read_but_not_memoized() -> None:
    """Contexts past the size bound are read each time and never kept, so the memo's
    memory is bounded by its count times that size."""
    big = {"blob": "x" * (header_module._READ_CONTEXT_MAX_BYTES + 1)}
    read = _read_plain_v2(_header_bytes(big), 0, 10)
    assert read is not None
    assert dict(read.header.encryption_context) == big
    assert serialize_encryption_context(big) not in header_module._READ_CONTEXTS


def test_a_memoized_out_of_order_context_is_still_reserialized_in_order() -> None:
    """The memo keeps 'not the serialization' (None) with an out-of-order context: a
    second header with those bytes does not hand them to keyrings either."""
    ordered = serialize_encryption_context({"a": "1", "b": "2"})
    reversed_entries = b"\x00\x02" + ordered[2 + 6 :] + ordered[2 : 2 + 6]
    start = 1 + 2 + 32 + 2
    for _ in range(2):
        buf = bytearray(_header_bytes({"a": "1", "b": "2"}))
        buf[start : start + len(ordered)] = reversed_entries
        read = _read_plain_v2(bytes(buf), 0, 10)
        assert read is not None
        assert stored_context_bytes(read.header) == ordered
