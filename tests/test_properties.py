"""Properties: round trips hold, and hostile bytes only ever raise the library's errors."""

from __future__ import annotations

import asyncio
import os

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from messages import build_encryptor, encryption_contexts

from aioenvelope import AlgorithmSuite, CommitmentPolicy, EnvelopeClient, RawAesKeyring, errors

SUITES = st.sampled_from(
    [
        AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY,
        AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384,
    ]
)
KEYRING = RawAesKeyring("prop", "key", os.urandom(32))
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


async def _round_trip(
    plaintext: bytes, context: dict[str, str], suite: AlgorithmSuite, frame_length: int
) -> bytes:
    async with EnvelopeClient(KEYRING) as client:
        message = await client.encrypt(
            plaintext, encryption_context=context, algorithm_suite=suite, frame_length=frame_length
        )
        return await client.decrypt(message, encryption_context=context)


@SETTINGS
@given(
    plaintext=st.binary(max_size=600),
    context=encryption_contexts,
    suite=SUITES,
    frame_length=st.integers(min_value=1, max_value=300),
)
def test_any_plaintext_context_and_frame_length_round_trip(
    plaintext: bytes, context: dict[str, str], suite: AlgorithmSuite, frame_length: int
) -> None:
    assert run(_round_trip(plaintext, context, suite, frame_length)) == plaintext


async def _decrypt(message: bytes, policy: CommitmentPolicy) -> bytes:
    async with EnvelopeClient(KEYRING, commitment_policy=policy) as client:
        return await client.decrypt(message)


@SETTINGS
@given(data=st.binary(max_size=400))
def test_random_bytes_only_raise_library_errors(data: bytes) -> None:
    with pytest.raises(errors.EnvelopeError):
        run(_decrypt(data, CommitmentPolicy.REQUIRE_ENCRYPT_ALLOW_DECRYPT))


EDITS = st.tuples(
    st.sampled_from(["replace", "insert", "delete", "cut"]),
    st.integers(0, 2**16),
    st.integers(1, 255),
    st.binary(min_size=1, max_size=8),
    st.integers(1, 8),
)


def apply_edit(
    message: bytearray, kind: str, position: int, value: int, blob: bytes, span: int
) -> None:
    at = position % (len(message) + 1)
    if kind == "replace" and at < len(message):
        message[at] ^= value
    elif kind == "insert":
        message[at:at] = blob
    elif kind == "delete":
        del message[at : at + span]
    else:
        del message[at:]


@st.composite
def mutations(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A valid message (any suite, v1 or v2) and a mutation of it."""
    suite = draw(st.sampled_from(list(AlgorithmSuite)))
    plaintext = draw(st.binary(max_size=80))
    context = draw(encryption_contexts)
    encryptor = build_encryptor(suite, context=context, frame_length=draw(st.integers(1, 40)))
    message = bytearray(encryptor.encrypt_all(plaintext))
    # Every draw is unconditional and positions are taken modulo the length: message
    # lengths vary between runs (DER signatures), and hypothesis needs stable draws.
    edits = draw(st.lists(EDITS, min_size=1, max_size=4))
    for kind, position, value, blob, span in edits:
        apply_edit(message, kind, position, value, blob, span)
    return bytes(message), bytes(encryptor.header)


@SETTINGS
@given(case=mutations())
def test_mutated_messages_only_raise_library_errors(case: tuple[bytes, bytes]) -> None:
    """The keyring knows none of these keys, so nothing may decrypt; the point is that
    every failure, in any layer, is one of ours (never KeyError, struct.error, ...)."""
    message, _ = case
    with pytest.raises(errors.EnvelopeError):
        run(_decrypt(message, CommitmentPolicy.REQUIRE_ENCRYPT_ALLOW_DECRYPT))


@st.composite
def mutated_own_messages(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A message our keyring can open, and a different byte string derived from it."""
    suite = draw(SUITES)
    plaintext = draw(st.binary(max_size=120))

    async def seal() -> bytes:
        async with EnvelopeClient(KEYRING, frame_length=32) as client:
            return await client.encrypt(plaintext, algorithm_suite=suite)

    original = run(seal())
    assert isinstance(original, bytes)
    message = bytearray(original)
    apply_edit(message, *draw(EDITS))
    return bytes(message), original


@SETTINGS
@given(case=mutated_own_messages())
def test_any_change_to_a_decryptable_message_is_refused(case: tuple[bytes, bytes]) -> None:
    message, original = case
    assume(message != original)
    with pytest.raises(errors.EnvelopeError):
        run(_decrypt(message, CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT))
