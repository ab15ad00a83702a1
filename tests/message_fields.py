"""Where a message's fields lie behind its header, and the exact refusal a one-bit flip
in each gets today.

Tampering and property tests flip bits everywhere and pin the error by where the flip
landed: a frame's sequence number or IV is malformed, its ciphertext or tag (or any
byte of non-framed content, or of the signature) fails authentication, and a changed
length is too long, truncated or forged depending on the value it now holds. The
header's end comes from the public ``inspect`` (see ``frame_layout``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from aioenvelope import errors, inspect
from aioenvelope.format.body import MAX_NON_FRAMED_LENGTH

__all__ = [
    "INPUT_REFUSALS",
    "TAG",
    "Field",
    "body_fields",
    "expected_refusal",
    "flipped",
    "header_checks",
]

TAG = 16
# What changed or hostile bytes may be refused with, each exactly: a ConfigurationError
# would blame the caller, a KMSError or bare KeyringError the keyring, a parent class
# hide which check fired.
INPUT_REFUSALS = {
    errors.MalformedMessageError,
    errors.TruncatedMessageError,
    errors.MessageLimitError,
    errors.AuthenticationError,
    errors.NoUsableKeyError,
}


@dataclass(frozen=True)
class Field:
    """A byte range of a message and the frame it belongs to (0: non-framed content,
    the footer, the header)."""

    name: str
    start: int
    end: int
    frame: int = 0

    def __contains__(self, position: int) -> bool:
        return self.start <= position < self.end


def flipped(message: bytes, position: int, bit: int | None = None) -> bytes:
    """``message`` with one bit of byte ``position`` flipped (``bit``, by default
    ``position % 8``, so a sweep over positions touches every bit of a field)."""
    mutant = bytearray(message)
    mutant[position] ^= 1 << (position % 8 if bit is None else bit)
    return bytes(mutant)


def body_fields(
    message: bytes, header_length: int, *, frame_length: int, signing: bool
) -> tuple[Field, ...]:
    """Walk the body (frames, or non-framed content when ``frame_length`` is 0) and the
    footer from the header's end, as the format lays them out; the walk must end
    exactly at the message's end."""
    fields: list[Field] = []
    at = header_length

    def add(name: str, length: int, frame: int) -> None:
        nonlocal at
        fields.append(Field(name, at, at + length, frame))
        at += length

    if frame_length:
        seq = 1
        while message[at : at + 4] != b"\xff" * 4:
            add("sequence number", 4, seq)
            add("IV", 12, seq)
            add("ciphertext", frame_length, seq)
            add("tag", TAG, seq)
            seq += 1
        add("end marker", 4, seq)
        add("sequence number", 4, seq)
        add("IV", 12, seq)
        final = struct.unpack(">I", message[at : at + 4])[0]
        add("final length", 4, seq)
        add("ciphertext", final, seq)
        add("tag", TAG, seq)
    else:
        add("content IV", 12, 0)
        content = struct.unpack(">Q", message[at : at + 8])[0]
        add("content length", 8, 0)
        add("content", content, 0)
        add("content tag", TAG, 0)
    if signing:
        add("signature length", 2, 0)
        add("signature", len(message) - at, 0)
    assert at == len(message), (at, len(message))
    return tuple(fields)


def expected_refusal(mutant: bytes, at: Field, frame_length: int) -> tuple[type, str]:
    """The exact error class and a pattern of its message for a one-bit flip in body or
    footer field ``at`` (``mutant`` is the flipped message)."""
    n = at.frame
    forged_frame = (errors.AuthenticationError, rf"^frame {n} failed authentication: ")
    forged_content = (errors.AuthenticationError, "^the message body failed authentication: ")
    forged_signature = (errors.AuthenticationError, "^message signature does not verify")
    after = len(mutant) - at.end  # the bytes that follow the field
    value = int.from_bytes(mutant[at.start : at.end], "big")
    if at.name in ("sequence number", "end marker"):
        return errors.MalformedMessageError, rf"^frame \d+ found where frame {n} belongs: "
    if at.name == "IV":
        return errors.MalformedMessageError, rf"^frame {n} has an IV that does not match it"
    if at.name in ("ciphertext", "tag"):
        return forged_frame
    if at.name == "final length":
        if value > frame_length:
            return (
                errors.MalformedMessageError,
                rf"^final frame holds {value} bytes, more than the frame length {frame_length}",
            )
        if value + TAG > after:
            return errors.TruncatedMessageError, rf"it ends inside frame {n}\."
        return forged_frame
    if at.name in ("content IV", "content", "content tag"):
        return forged_content
    if at.name == "content length":
        if value > MAX_NON_FRAMED_LENGTH:
            return (
                errors.MalformedMessageError,
                rf"^non-framed content of {value} bytes is longer than the format allows",
            )
        if value + TAG > after:
            return errors.TruncatedMessageError, "it ends inside the non-framed content"
        return forged_content
    if at.name == "signature length":
        if value > after:
            return errors.TruncatedMessageError, "it ends inside the signature footer"
        return forged_signature
    assert at.name == "signature", at
    return forged_signature


def header_checks(message: bytes, header_length: int) -> list[tuple[Field, type, str]]:
    """Header fields whose every one-bit flip is refused by one fixed check, with that
    check's error class and message pattern: the version byte; the message ID (the key
    is derived from it: v2's commitment, v1's header tag); the wrapped data key (the
    keyring cannot unwrap it); v2's key commitment; the header's tag. A message with
    one EDK, as the tests write."""
    header = inspect(message)
    suite = header.algorithm_suite
    v2 = suite.message_version == 2
    (edk,) = header.encrypted_data_keys
    wrapped = message.index(edk.ciphertext)
    id_at = 3 if v2 else 4
    tag_at = header_length - TAG
    commitment_check = (errors.AuthenticationError, "^key commitment does not match")
    header_tag_check = (errors.AuthenticationError, "^header authentication failed")
    checks: list[tuple[Field, type, str]] = [
        (Field("version", 0, 1), errors.MalformedMessageError, "unknown version byte"),
        (
            Field("message ID", id_at, id_at + len(header.message_id)),
            *(commitment_check if v2 else header_tag_check),
        ),
        (
            Field("wrapped data key", wrapped, wrapped + len(edk.ciphertext)),
            errors.NoUsableKeyError,
            r"\(1 named this key\)",
        ),
        (Field("header tag", tag_at, header_length), *header_tag_check),
    ]
    if v2:
        start = tag_at - suite.info.suite_data_length
        checks.append((Field("key commitment", start, tag_at), *commitment_check))
    return checks
