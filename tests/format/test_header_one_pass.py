"""The one-pass header reader (``struct``, no cursor) against the checked step-by-step
parser: it must read exactly what the checked parser reads, and give way to it for
anything else, so that every error is still the checked parser's own."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from aioenvelope.errors import MalformedMessageError, MessageLimitError
from aioenvelope.format import AlgorithmSuite, ContentType
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
