"""Encryption-context serialization, byte for byte (spec: framework/structures.md)."""

from __future__ import annotations

import pytest
from hypothesis import given
from messages import encryption_contexts

from aioenvelope.errors import EncryptionContextError, MalformedMessageError
from aioenvelope.format import encryption_context as ec_module
from aioenvelope.format.encryption_context import (
    deserialize_encryption_context,
    serialize_encryption_context,
    validate_user_context,
)


def test_empty_context_serializes_to_zero_bytes() -> None:
    assert serialize_encryption_context({}) == b""
    assert deserialize_encryption_context(b"") == {}


def test_serialization_matches_the_specified_layout() -> None:
    data = serialize_encryption_context({"b": "2", "a": "xy"})
    assert data == bytes.fromhex("000200016100027879000162000132")


def test_entries_sort_by_utf8_bytes_not_utf16_units() -> None:
    # U+FFFF is EF BF BF in UTF-8 and sorts before U+10002 (F0 ...), while in UTF-16
    # the surrogate D800 would sort first. The spec orders by UTF-8 bytes.
    data = serialize_encryption_context({"\U00010002": "x", "\uffff": "y"})
    assert data.index("\uffff".encode()) < data.index("\U00010002".encode())


def test_lengths_count_utf8_bytes() -> None:
    data = serialize_encryption_context({"é": "日本"})
    assert (
        data == bytes.fromhex("00010002") + "é".encode() + bytes.fromhex("0006") + "日本".encode()
    )


@given(encryption_contexts)
def test_serialization_round_trips(context: dict[str, str]) -> None:
    assert deserialize_encryption_context(serialize_encryption_context(context)) == context


def test_context_too_large_for_the_header_is_refused() -> None:
    with pytest.raises(EncryptionContextError, match="at most 65535"):
        serialize_encryption_context({"k": "v" * 65530})


def test_non_string_entries_are_refused() -> None:
    with pytest.raises(EncryptionContextError, match="must be str"):
        serialize_encryption_context({"k": 1})  # type: ignore[dict-item]


@pytest.mark.parametrize("key", ["aws-crypto-public-key", "aws-crypto-anything"])
def test_reserved_prefix_is_refused_on_encrypt(key: str) -> None:
    with pytest.raises(EncryptionContextError, match="reserved prefix"):
        validate_user_context({key: "v"})


def test_duplicate_keys_are_refused_on_read() -> None:
    entry = bytes.fromhex("000161000131")
    with pytest.raises(MalformedMessageError, match="duplicated"):
        deserialize_encryption_context(bytes.fromhex("0002") + entry + entry)


def test_zero_count_with_bytes_is_refused() -> None:
    with pytest.raises(MalformedMessageError):
        deserialize_encryption_context(bytes.fromhex("0000"))


@pytest.mark.parametrize(
    "data",
    [
        bytes.fromhex("0001000561"),  # key length beyond the end
        bytes.fromhex("0002000161000131"),  # second entry missing
        bytes.fromhex("000100016100013100"),  # trailing byte
        bytes.fromhex("00010001ff000131"),  # invalid UTF-8
    ],
)
def test_malformed_context_raises_library_error(data: bytes) -> None:
    with pytest.raises(MalformedMessageError):
        deserialize_encryption_context(data)


def test_a_memoized_serialization_is_the_same_for_every_order_of_the_pairs() -> None:
    """Serializations are kept by the pairs in the caller's order; another order is
    another memo entry with the same canonical bytes."""
    first = serialize_encryption_context({"b": "2", "a": "1"})
    again = serialize_encryption_context({"b": "2", "a": "1"})
    other_order = serialize_encryption_context({"a": "1", "b": "2"})
    assert first == again == other_order == bytes.fromhex("0002000161000131000162000132")


def test_serialization_memo_stays_bounded_under_ten_thousand_distinct_contexts() -> None:
    """Per-record contexts (or a caller's flood of them) empty the memo when it is full,
    and every one still serializes to its own bytes."""
    for n in range(10_000):
        context = {"record": str(n)}
        assert deserialize_encryption_context(serialize_encryption_context(context)) == context
        assert len(ec_module._SERIALIZED) <= ec_module._SERIALIZED_MAX


def test_refused_and_large_contexts_are_never_memoized() -> None:
    """Only serializations that succeeded and fit the size bound are kept: a refused
    context is refused again (not answered from the memo), a large one is kept nowhere."""
    for _ in range(2):
        with pytest.raises(EncryptionContextError):
            serialize_encryption_context({"k": 1})  # type: ignore[dict-item]
    large = {"k": "v" * (ec_module._SERIALIZED_MAX_BYTES + 1)}
    assert deserialize_encryption_context(serialize_encryption_context(large)) == large
    assert tuple(large.items()) not in ec_module._SERIALIZED
    with pytest.raises(EncryptionContextError):
        serialize_encryption_context({"k": ["unhashable"]})  # type: ignore[dict-item]


def test_a_value_that_cannot_be_hashed_is_refused_as_an_encryption_context_error() -> None:
    """The memo hashes the pairs first; a value whose hash raises anything (a writable
    memoryview raises ValueError) is still refused by the serializer's own error."""
    for value in (memoryview(bytearray(b"v")), ["list"]):
        with pytest.raises(EncryptionContextError, match="must be str"):
            serialize_encryption_context({"k": value})  # type: ignore[dict-item]


def test_a_str_subclass_never_answers_for_a_plain_str() -> None:
    """A str subclass hashes and compares as str but may encode as it likes: its
    serialization is not memoized, so the plain str's is its own."""

    class Weird(str):
        def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
            return b"evil"

    serialize_encryption_context({"tenant": Weird("t1")})
    assert serialize_encryption_context({"tenant": "t1"}) == b"\x00\x01\x00\x06tenant\x00\x02t1"
