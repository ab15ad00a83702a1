"""One-shot ``EnvelopeClient.encrypt``/``decrypt`` against the ESDK and raw AES-GCM.

Small messages measure per-message overhead (key generation and wrapping, HKDF, header),
where the ESDK is the reference; large ones measure the framing loop, where one raw
``AESGCM`` call over the whole buffer is the ceiling.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from functools import partial

import anyio.to_thread
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from aioenvelope import AlgorithmSuite, EnvelopeClient, RawAesKeyring

from .common import KIB, MIB, Case, Reference, Runner, Settings, Subject, check
from .esdk import ESDK_LABEL, EsdkReference
from .floor import CryptoFloor

__all__ = ["collect"]

FRAME_LENGTH = 64 * KIB
CONTEXT: Mapping[str, str] = {"purpose": "bench"}
NAMESPACE, KEY_NAME = "bench", "aes-256"
DEFAULT_SUITE = AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY
SIGNING_SUITE = AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384
# Raw AES-GCM references reuse one nonce: their output is thrown away, only work is timed.
NONCE = bytes(12)


# -- runners: each does n ops back to back; ours are awaited on the running loop ------


def _sync(op: Callable[[], object]) -> Runner:
    """A blocking op run on the loop's thread, as a synchronous caller would."""

    async def run(n: int) -> None:
        for _ in range(n):
            op()

    return run


def _offloaded(op: Callable[[], object]) -> Runner:
    """A blocking op run in anyio's worker thread, as ``EnvelopeClient`` runs >= 1 MiB.

    Large references must go through the same thread as ours: glibc gives each thread
    its own malloc arena, and on the loop's thread every 16 MiB buffer was fresh memory
    (4,096 page faults, about as long as the AES itself in a VM) while the worker's
    arena reused its pages, so the ratio measured the allocator, not the library.
    """

    async def run(n: int) -> None:
        for _ in range(n):
            await anyio.to_thread.run_sync(op)

    return run


def _ours_encrypt(client: EnvelopeClient, data: bytes) -> Subject:
    async def run(n: int) -> None:
        for _ in range(n):
            await client.encrypt(data, encryption_context=CONTEXT)

    return Subject("aioenvelope", run)


def _ours_decrypt(client: EnvelopeClient, blob: bytes) -> Subject:
    async def run(n: int) -> None:
        for _ in range(n):
            await client.decrypt(blob, encryption_context=CONTEXT)

    return Subject("aioenvelope", run)


# -- verification: one round trip per case, plus cross-decryption with the ESDK ------


async def _round_trips(
    client: EnvelopeClient, esdk: EsdkReference, suite: AlgorithmSuite, data: bytes
) -> tuple[bytes, bytes]:
    """Our message and the ESDK's for ``data``, each checked to decrypt on both sides.

    Cross-decryption (and the suite and frame length read back from the headers) shows
    the reference is configured like ours, so its rate is a fair comparison.
    """
    ours = await client.encrypt(data, encryption_context=CONTEXT)
    theirs = esdk.encrypt(data, suite=suite, encryption_context=CONTEXT, frame_length=FRAME_LENGTH)
    what = f"{suite.name}, {len(data)} bytes"
    check(
        await client.decrypt(ours, encryption_context=CONTEXT) == data,
        f"aioenvelope round trip lost data ({what})",
    )
    check(
        esdk.decrypt(ours, encryption_context=CONTEXT) == data,
        f"the ESDK did not read aioenvelope's message back ({what})",
    )
    check(
        esdk.decrypt(theirs, encryption_context=CONTEXT) == data,
        f"ESDK round trip lost data ({what})",
    )
    result = await client.decrypt_with_header(theirs, encryption_context=CONTEXT)
    check(result.plaintext == data, f"aioenvelope did not read the ESDK's message back ({what})")
    for name, blob in (("aioenvelope", ours), ("ESDK", theirs)):
        header = (await client.decrypt_with_header(blob, encryption_context=CONTEXT)).header
        check(
            header.algorithm_suite is suite and header.frame_length == FRAME_LENGTH,
            f"{name} wrote {header.algorithm_suite.name} with frame length "
            f"{header.frame_length}; the bench asked for {suite.name} and {FRAME_LENGTH}",
        )
    return ours, theirs


def _raw_round_trip(aead: AESGCM, data: bytes) -> bytes:
    sealed = aead.encrypt(NONCE, data, None)
    check(aead.decrypt(NONCE, sealed, None) == data, "raw AES-GCM round trip lost data")
    return sealed


# -- cases ----------------------------------------------------------------------------

RAW_LABEL = "raw AESGCM, one call"
RAW_FLOOR_LABEL = "raw AESGCM only (floor)"
FLOOR_LABEL = "crypto calls only (floor)"
# Issue 18: at least half the speed of the cryptography a message needs.
FLOOR_TARGET = 0.5


def _esdk_encrypt(esdk: EsdkReference, data: bytes, suite: AlgorithmSuite) -> partial[bytes]:
    return partial(
        esdk.encrypt, data, suite=suite, encryption_context=CONTEXT, frame_length=FRAME_LENGTH
    )


def _esdk_decrypt(esdk: EsdkReference, blob: bytes) -> partial[bytes]:
    return partial(esdk.decrypt, blob, encryption_context=CONTEXT)


async def _small_message_cases(
    client: EnvelopeClient, esdk: EsdkReference, aead: AESGCM, key: bytes
) -> list[Case]:
    """1 KiB, default suite: ours must be >= 10x the ESDK and >= 0.5x the floor of every
    cryptographic call a message needs with no format code (which bounds what any
    Python code can reach). Raw AES-GCM of 1 KiB, for information.
    """
    data = os.urandom(KIB)
    ours_blob, esdk_blob = await _round_trips(client, esdk, DEFAULT_SUITE, data)
    sealed = _raw_round_trip(aead, data)
    # Header body = message - final frame (4+4+12+4 bytes, data, 16-byte tag) - header tag.
    floor = CryptoFloor(key, header_body_length=len(ours_blob) - 40 - len(data) - 16)
    floor_sealed = floor.encrypt(data)
    check(floor.decrypt(floor_sealed) == data, "the crypto floor's round trip lost data")
    group = f"1 KiB 0x{DEFAULT_SUITE.suite_id:04X}"
    encrypt_refs = (
        Reference(ESDK_LABEL, _sync(_esdk_encrypt(esdk, data, DEFAULT_SUITE)), target=10),
        Reference(FLOOR_LABEL, _sync(partial(floor.encrypt, data)), target=FLOOR_TARGET),
        Reference(RAW_FLOOR_LABEL, _sync(partial(aead.encrypt, NONCE, data, None))),
    )
    decrypt_refs = (
        Reference(ESDK_LABEL, _sync(_esdk_decrypt(esdk, esdk_blob)), target=10),
        Reference(FLOOR_LABEL, _sync(partial(floor.decrypt, floor_sealed)), target=FLOOR_TARGET),
        Reference(RAW_FLOOR_LABEL, _sync(partial(aead.decrypt, NONCE, sealed, None))),
    )
    return [
        Case(group, "encrypt", "msg/s", 1, _ours_encrypt(client, data), encrypt_refs),
        Case(group, "decrypt", "msg/s", 1, _ours_decrypt(client, ours_blob), decrypt_refs),
    ]


async def _large_message_cases(
    client: EnvelopeClient, esdk: EsdkReference, aead: AESGCM
) -> list[Case]:
    """16 MiB in 64 KiB frames: ours must be >= 0.7x one raw AES-GCM call over it all.

    The library offloads messages >= 1 MiB to anyio's worker thread; the references run
    there too (see ``_offloaded``). One thread does AES at a time: one core.
    """
    size = 16 * MIB
    data = os.urandom(size)
    ours_blob, esdk_blob = await _round_trips(client, esdk, DEFAULT_SUITE, data)
    sealed = _raw_round_trip(aead, data)
    group = f"16 MiB 0x{DEFAULT_SUITE.suite_id:04X} 64K frames"
    encrypt_refs = (
        Reference(RAW_LABEL, _offloaded(partial(aead.encrypt, NONCE, data, None)), target=0.7),
        Reference(ESDK_LABEL, _offloaded(_esdk_encrypt(esdk, data, DEFAULT_SUITE))),
    )
    decrypt_refs = (
        Reference(RAW_LABEL, _offloaded(partial(aead.decrypt, NONCE, sealed, None)), target=0.7),
        Reference(ESDK_LABEL, _offloaded(_esdk_decrypt(esdk, esdk_blob))),
    )
    mb = size / 1e6
    return [
        Case(group, "encrypt", "MB/s", mb, _ours_encrypt(client, data), encrypt_refs),
        Case(group, "decrypt", "MB/s", mb, _ours_decrypt(client, ours_blob), decrypt_refs),
    ]


async def _signing_suite_cases(client: EnvelopeClient, esdk: EsdkReference) -> list[Case]:
    """1 KiB with ECDSA P-384 signatures, for information: signing dominates both sides."""
    data = os.urandom(KIB)
    ours_blob, esdk_blob = await _round_trips(client, esdk, SIGNING_SUITE, data)
    group = f"1 KiB 0x{SIGNING_SUITE.suite_id:04X} (signing)"
    encrypt_ref = Reference(ESDK_LABEL, _sync(_esdk_encrypt(esdk, data, SIGNING_SUITE)))
    decrypt_ref = Reference(ESDK_LABEL, _sync(_esdk_decrypt(esdk, esdk_blob)))
    return [
        Case(group, "encrypt", "msg/s", 1, _ours_encrypt(client, data), (encrypt_ref,)),
        Case(group, "decrypt", "msg/s", 1, _ours_decrypt(client, ours_blob), (decrypt_ref,)),
    ]


async def collect(settings: Settings, stack: AsyncExitStack) -> list[Case]:
    """Build (and verify) the one-shot cases; clients stay open until ``stack`` closes."""
    del settings  # the same cases in quick and full runs: only the timing is shorter
    key = os.urandom(32)
    esdk = EsdkReference(NAMESPACE, KEY_NAME, key)
    aead = AESGCM(key)

    async def client(suite: AlgorithmSuite | None) -> EnvelopeClient:
        keyring = RawAesKeyring(NAMESPACE, KEY_NAME, key)
        # No key manager cache: the ESDK reference here has none either, so each message
        # pays for its own data key (the KMS warm-cache case compares caching to caching).
        return await stack.enter_async_context(
            EnvelopeClient(keyring, algorithm_suite=suite, frame_length=FRAME_LENGTH, cache=None)
        )

    # The library's default suite is what users get, so it is what we time.
    default, signing = await client(None), await client(SIGNING_SUITE)
    check(
        default.algorithm_suite is DEFAULT_SUITE,
        f"EnvelopeClient's default suite is {default.algorithm_suite}, not 0x0478",
    )
    return [
        *await _small_message_cases(default, esdk, aead, key),
        *await _large_message_cases(default, esdk, aead),
        *await _signing_suite_cases(signing, esdk),
    ]
