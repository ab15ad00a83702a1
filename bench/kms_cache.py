"""1 KiB over a KMS keyring with warm caches, against the ESDK's caching materials manager.

Both sides talk to the same embedded KMS (moto on loopback, in this process) under the
same key, with the same reuse limits (``CacheConfig``'s defaults: 5 minutes, 100,000
messages, 4 GiB per data key): encrypt reuses a cached data key, decrypt finds the
message's data key cached. After the warm-up neither side should call KMS at all, so the
rates are the per-message cost of cached envelope encryption; the KMS calls each side
made while being timed are counted and printed above the table to show it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import aws_encryption_sdk
import botocore.session
from aws_encryption_sdk.identifiers import Algorithm, CommitmentPolicy

from aioenvelope import AlgorithmSuite, CacheConfig, EnvelopeClient, KmsKeyring
from aioenvelope.errors import ConfigurationError
from aioenvelope.testing import EmbeddedAws, embedded_aws

from .common import KIB, BenchError, Case, Reference, Runner, Settings, Subject, check
from .esdk import ESDK_LABEL
from .floor import CryptoFloor

__all__ = ["collect"]

FRAME_LENGTH = 64 * KIB
CONTEXT: Mapping[str, str] = {"purpose": "bench"}
SUITE = AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY  # the library's default
CACHE = CacheConfig()
ESDK_CACHING_LABEL = f"{ESDK_LABEL} caching CMM"
TARGET = 10.0
WARM_FLOOR_LABEL = "crypto calls, key known (floor)"
FLOOR_TARGET = 0.5  # issue 18: half the speed of the cryptography a warm message needs
# Warm-up round trips after which neither side may call KMS again (else: not caching).
WARM_CHECKS = 3


@dataclass
class KmsTally:
    """KMS calls one subject made while timed (calibration included), per message."""

    label: str
    messages: int = 0
    kms_calls: int = 0


def _counted(run: Runner, kms_calls: Callable[[], int], tally: KmsTally) -> Runner:
    """``run``, adding the KMS calls made during each batch to ``tally``."""

    async def counted(n: int) -> None:
        before = kms_calls()
        await run(n)
        tally.kms_calls += kms_calls() - before
        tally.messages += n

    return counted


class EsdkCachingKms:
    """``EncryptionSDKClient`` with a ``CachingCryptoMaterialsManager`` over a
    ``StrictAwsKmsMasterKeyProvider``, pointed at the embedded KMS.

    Its botocore session has throwaway credentials (real ones never go to the stand-in)
    and an event hook that counts every KMS API call its clients make.
    """

    def __init__(self, kms: EmbeddedAws, key_arn: str, cache: CacheConfig) -> None:
        self.kms_calls = 0
        session = botocore.session.Session()
        session.set_credentials("embedded-kms", "embedded-kms")
        session.register("before-call.kms", self._count)
        # The ESDK makes its own clients with no endpoint argument: botocore reads
        # AWS_ENDPOINT_URL_KMS (set by ``collect``) when each one is created.
        provider = aws_encryption_sdk.StrictAwsKmsMasterKeyProvider(
            key_ids=[key_arn], botocore_session=session
        )
        endpoint = provider.master_key(key_arn).config.client.meta.endpoint_url
        check(
            endpoint == kms.endpoint_url,
            f"the ESDK's KMS client uses {endpoint}, not the embedded KMS at {kms.endpoint_url}",
        )
        self._cmm = aws_encryption_sdk.CachingCryptoMaterialsManager(
            master_key_provider=provider,
            cache=aws_encryption_sdk.LocalCryptoMaterialsCache(
                capacity=cache.encrypt_entries + cache.decrypt_entries
            ),
            max_age=float(cache.max_age),
            max_messages_encrypted=cache.max_messages,
            max_bytes_encrypted=cache.max_bytes,
        )
        self._client = aws_encryption_sdk.EncryptionSDKClient(
            commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
        )

    def _count(self, **_: Any) -> None:
        self.kms_calls += 1

    def encrypt(self, data: bytes) -> bytes:
        ciphertext, _header = self._client.encrypt(
            source=data,
            materials_manager=self._cmm,
            encryption_context=dict(CONTEXT),
            algorithm=Algorithm.get_by_id(SUITE.suite_id),
            frame_length=FRAME_LENGTH,
        )
        return bytes(ciphertext)

    def decrypt(self, blob: bytes) -> bytes:
        """Decrypt and check the context, as ``EnvelopeClient.decrypt`` does (see
        ``esdk.EsdkReference.decrypt``: the ESDK takes no context on decrypt)."""
        plaintext, header = self._client.decrypt(source=blob, materials_manager=self._cmm)
        for key, value in CONTEXT.items():
            if header.encryption_context.get(key) != value:
                raise BenchError(f"ESDK: encryption context mismatch for {key!r}")
        return bytes(plaintext)


def _ours_kms_calls(keyring: KmsKeyring) -> Callable[[], int]:
    return lambda: sum(keyring.kms_calls.values())


async def _round_trips(
    client: EnvelopeClient, esdk: EsdkCachingKms, data: bytes
) -> tuple[bytes, bytes]:
    """Our message and the ESDK's, each decrypted on both sides (same key, same suite,
    same frame length: a like-for-like comparison); this also warms every cache."""
    ours = await client.encrypt(data, encryption_context=CONTEXT)
    theirs = esdk.encrypt(data)
    check(
        await client.decrypt(ours, encryption_context=CONTEXT) == data,
        "aioenvelope KMS round trip lost data",
    )
    check(esdk.decrypt(ours) == data, "the ESDK did not read aioenvelope's KMS message back")
    check(esdk.decrypt(theirs) == data, "ESDK KMS round trip lost data")
    for name, blob in (("aioenvelope", ours), ("ESDK", theirs)):
        result = await client.decrypt_with_header(blob, encryption_context=CONTEXT)
        check(result.plaintext == data, f"aioenvelope did not read the {name} message back")
        header = result.header
        check(
            header.algorithm_suite is SUITE and header.frame_length == FRAME_LENGTH,
            f"{name} wrote {header.algorithm_suite.name} with frame length "
            f"{header.frame_length}; the bench asked for {SUITE.name} and {FRAME_LENGTH}",
        )
    return ours, theirs


async def _check_warm(
    client: EnvelopeClient,
    ours_calls: Callable[[], int],
    esdk: EsdkCachingKms,
    data: bytes,
    blobs: tuple[bytes, bytes],
) -> None:
    """Once warm, neither side may call KMS: else it is not caching and the comparison
    would time KMS round trips, not the libraries."""
    ours_before, esdk_before = ours_calls(), esdk.kms_calls
    for _ in range(WARM_CHECKS):
        await client.encrypt(data, encryption_context=CONTEXT)
        await client.decrypt(blobs[0], encryption_context=CONTEXT)
        esdk.encrypt(data)
        esdk.decrypt(blobs[1])
    check(
        ours_calls() == ours_before,
        f"aioenvelope made {ours_calls() - ours_before} KMS calls with warm caches",
    )
    check(
        esdk.kms_calls == esdk_before,
        f"the ESDK's caching CMM made {esdk.kms_calls - esdk_before} KMS calls when warm",
    )


def _report(tallies: list[tuple[str, KmsTally]]) -> None:
    lines = [
        f"  {case}: {t.label}: {t.kms_calls} KMS calls in {t.messages:,} messages"
        for case, t in tallies
        if t.messages
    ]
    if lines:
        print("KMS calls while timed (calibration included; ~0 expected with warm caches):")
        print("\n".join(lines), flush=True)


@dataclass
class _EnvVar:
    """Set an environment variable until ``restore``."""

    name: str
    saved: str | None = None

    def set(self, value: str) -> None:
        self.saved = os.environ.get(self.name)
        os.environ[self.name] = value

    def restore(self) -> None:
        if self.saved is None:
            os.environ.pop(self.name, None)
        else:
            os.environ[self.name] = self.saved


async def collect(settings: Settings, stack: AsyncExitStack) -> list[Case]:
    """Start the embedded KMS, build both sides, verify and warm them; cases to time."""
    del settings  # the same cases in quick and full runs: only the timing is shorter
    try:
        kms = stack.enter_context(embedded_aws())
    except ConfigurationError as exc:
        raise BenchError(f"{exc} (the KMS benchmark needs moto[server])") from exc
    key_arn = await kms.create_kms_key("bench-kms-cache")
    endpoint = _EnvVar("AWS_ENDPOINT_URL_KMS")
    endpoint.set(kms.endpoint_url)
    stack.callback(endpoint.restore)

    keyring = KmsKeyring(
        key_arn, session=kms.session(), region_name=kms.region, endpoint_url=kms.endpoint_url
    )
    client = await stack.enter_async_context(
        EnvelopeClient(keyring, cache=CACHE, frame_length=FRAME_LENGTH)
    )
    check(client.algorithm_suite is SUITE, f"the default suite is {client.algorithm_suite}")
    esdk = EsdkCachingKms(kms, key_arn, CACHE)
    ours_calls = _ours_kms_calls(keyring)

    data = os.urandom(KIB)
    blobs = await _round_trips(client, esdk, data)
    await _check_warm(client, ours_calls, esdk, data, blobs)
    ours_blob, esdk_blob = blobs

    async def ours_encrypt(n: int) -> None:
        for _ in range(n):
            await client.encrypt(data, encryption_context=CONTEXT)

    async def ours_decrypt(n: int) -> None:
        for _ in range(n):
            await client.decrypt(ours_blob, encryption_context=CONTEXT)

    async def esdk_encrypt(n: int) -> None:
        for _ in range(n):
            esdk.encrypt(data)

    async def esdk_decrypt(n: int) -> None:
        for _ in range(n):
            esdk.decrypt(esdk_blob)

    # The warm floor: the calls a message needs once its data key is known (derive,
    # commit, header tag, one frame), with no format code and no cache lookup.
    floor = CryptoFloor(os.urandom(32), header_body_length=len(ours_blob) - 40 - KIB - 16)
    floor_key = os.urandom(32)
    floor_sealed = floor.encrypt_warm(floor_key, data)
    check(floor.decrypt_warm(floor_key, floor_sealed) == data, "the warm floor lost data")

    async def floor_encrypt(n: int) -> None:
        for _ in range(n):
            floor.encrypt_warm(floor_key, data)

    async def floor_decrypt(n: int) -> None:
        for _ in range(n):
            floor.decrypt_warm(floor_key, floor_sealed)

    group = f"1 KiB 0x{SUITE.suite_id:04X} KMS, warm caches"
    tallies: list[tuple[str, KmsTally]] = []
    cases: list[Case] = []
    for op, ours_run, esdk_run, floor_run in (
        ("encrypt", ours_encrypt, esdk_encrypt, floor_encrypt),
        ("decrypt", ours_decrypt, esdk_decrypt, floor_decrypt),
    ):
        ours_tally, esdk_tally = KmsTally("aioenvelope"), KmsTally(ESDK_CACHING_LABEL)
        tallies += [(f"{group} {op}", ours_tally), (f"{group} {op}", esdk_tally)]
        ours = Subject("aioenvelope", _counted(ours_run, ours_calls, ours_tally))
        reference = Reference(
            ESDK_CACHING_LABEL,
            _counted(esdk_run, lambda: esdk.kms_calls, esdk_tally),
            target=TARGET,
        )
        floor_reference = Reference(WARM_FLOOR_LABEL, floor_run, target=FLOOR_TARGET)
        cases.append(Case(group, op, "msg/s", 1, ours, (reference, floor_reference)))
    stack.callback(_report, tallies)
    return cases
