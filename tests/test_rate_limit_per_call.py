"""The decrypt rate limit is charged per remote unwrap call, not per cache miss.

One miss on a message with N EDKs can make N KMS Decrypt calls, so a token per miss let
a caller spend up to ``max_encrypted_data_keys`` calls per token. Now each Decrypt
request takes one (counted at the fault proxy in front of a real moto KMS); a breaker
that fails fast costs none; and a keyring of your own that calls a remote service
charges the same bucket through the runtime. That keyrings which unwrap locally take
no token, and each remote unwrap one, every keyring shows in test_keyring_conformance.
The clock is a FakeClock that nobody moves: no token comes back during a test.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import pytest
from fake_clock import FakeClock
from fault_proxy import FaultProxy
from kms_server import KmsKey, MotoKms
from moto_keyrings import moto_kms_keyring

from aioenvelope import (
    DecryptionMaterials,
    EncryptedDataKey,
    EncryptionMaterials,
    EnvelopeClient,
    Keyring,
    MultiKeyring,
    RateLimit,
    RawAesKeyring,
    errors,
)
from aioenvelope.runtime import Runtime

CONTEXT = {"tenant": "t1", "purpose": "rate-limit-per-call-tests"}
PLAINTEXT = b"attack at dawn " * 7
N = 4  # EDKs per message: N - 1 that KMS refuses, then the genuine one


class BogusFirst(Keyring):
    """Makes the data key and puts ``count`` EDKs under ``arn`` that KMS will refuse
    (random ciphertext) ahead of the genuine one a KmsKeyring child adds."""

    def __init__(self, arn: str, count: int) -> None:
        self.arn, self.count = arn, count

    async def on_encrypt(self, materials: EncryptionMaterials) -> EncryptionMaterials:
        materials = materials.generate_data_key()
        for _ in range(self.count):
            edk = EncryptedDataKey("aws-kms", self.arn.encode(), os.urandom(184))
            materials = materials.with_encrypted_data_key(edk)
        return materials


async def message_with_failing_edks_first(moto_kms: MotoKms, key: KmsKey) -> bytes:
    writer = MultiKeyring(
        generator=BogusFirst(key.arn, N - 1),
        children=[moto_kms_keyring(moto_kms, key.arn, check_keys=False)],
    )
    async with EnvelopeClient(writer, cache=None) as client:
        return await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)


def decrypts(fault_proxy: FaultProxy) -> int:
    return fault_proxy.requests().get("Decrypt", 0)


async def test_a_message_whose_first_edks_fail_costs_a_token_per_decrypt_call(
    moto_kms: MotoKms, kms_key: KmsKey, fault_proxy: FaultProxy
) -> None:
    """N EDKs, the first N - 1 refused by KMS: N Decrypt calls, N tokens. With a burst of
    N the message decrypts and the bucket is empty after it; with N - 1 the Nth call is
    refused (429) before it is sent."""
    blob = await message_with_failing_edks_first(moto_kms, kms_key)
    limit = RateLimit(rate=1.0, burst=N)
    reader = moto_kms_keyring(moto_kms, kms_key.arn, endpoint_url=fault_proxy.url, check_keys=False)
    async with EnvelopeClient(
        reader, cache=None, decrypt_rate_limit=limit, clock=FakeClock()
    ) as client:
        assert await client.decrypt(blob, encryption_context=CONTEXT) == PLAINTEXT
        assert decrypts(fault_proxy) == N
        with pytest.raises(errors.KMSDecryptRateLimited):
            await client.decrypt(blob, encryption_context=CONTEXT)
        assert decrypts(fault_proxy) == N
        assert client.stats.rate_limited == 1

    short = RateLimit(rate=1.0, burst=N - 1)
    reader = moto_kms_keyring(moto_kms, kms_key.arn, endpoint_url=fault_proxy.url, check_keys=False)
    async with EnvelopeClient(
        reader, cache=None, decrypt_rate_limit=short, clock=FakeClock()
    ) as client:
        with pytest.raises(errors.KMSDecryptRateLimited):
            await client.decrypt(blob, encryption_context=CONTEXT)
    assert decrypts(fault_proxy) == N + N - 1


async def test_a_region_whose_breaker_is_open_costs_no_token(
    moto_kms: MotoKms, kms_key: KmsKey, fault_proxy: FaultProxy
) -> None:
    """Failing fast sends nothing, so it spends nothing: after five failed calls (five
    tokens) open the breaker, any number of refused decrypts leave the bucket alone."""
    blob = await message_with_failing_edks_first(moto_kms, kms_key)
    reader = moto_kms_keyring(
        moto_kms, kms_key.arn, endpoint_url=fault_proxy.url, check_keys=False, max_attempts=1
    )
    limit = RateLimit(rate=1.0, burst=5)
    async with EnvelopeClient(
        reader, cache=None, decrypt_rate_limit=limit, clock=FakeClock()
    ) as client:
        fault_proxy.fail_next(5, 500, operation="Decrypt")
        with pytest.raises(errors.KMSError):
            await client.decrypt(blob, encryption_context=CONTEXT)  # 4 calls, 4 tokens
        with pytest.raises(errors.CircuitOpenError):
            await client.decrypt(blob, encryption_context=CONTEXT)  # 1 call, then it opens
        assert decrypts(fault_proxy) == 5
        for _ in range(10):
            with pytest.raises(errors.CircuitOpenError):
                await client.decrypt(blob, encryption_context=CONTEXT)
        assert client.stats.rate_limited == 0
    assert decrypts(fault_proxy) == 5


class RemoteUnwrapKeyring(Keyring):
    """A keyring of one's own for some remote key service (here: a local AES key that
    stands in for it). Like the KMS keyrings, it charges the client's bucket once per
    unwrap request through the runtime it was attached to."""

    def __init__(self) -> None:
        self.inner = RawAesKeyring("remote", "key", os.urandom(32))
        self.runtime: Runtime | None = None
        self.requests = 0

    def attach(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def on_encrypt(self, materials: EncryptionMaterials) -> EncryptionMaterials:
        return await self.inner.on_encrypt(materials)

    async def on_decrypt(
        self, materials: DecryptionMaterials, encrypted_data_keys: Sequence[EncryptedDataKey]
    ) -> DecryptionMaterials:
        for edk in encrypted_data_keys:
            assert self.runtime is not None
            await self.runtime.admit_remote_decrypt()
            self.requests += 1
            try:
                return await self.inner.on_decrypt(materials, [edk])
            except errors.KeyringError:
                continue
        raise errors.NoUsableKeyError("no EDK could be unwrapped")


async def test_a_remote_keyring_of_ones_own_charges_the_same_bucket() -> None:
    """The charge is a runtime facility, not KMS code: a custom keyring's two unwrap
    requests take two tokens, and the third is refused with the same 429."""
    remote = RemoteUnwrapKeyring()
    limit = RateLimit(rate=1.0, burst=2)
    async with EnvelopeClient(
        remote, cache=None, decrypt_rate_limit=limit, clock=FakeClock()
    ) as client:
        blob = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        assert await client.decrypt(blob, encryption_context=CONTEXT) == PLAINTEXT
        assert await client.decrypt(blob, encryption_context=CONTEXT) == PLAINTEXT
        with pytest.raises(errors.KMSDecryptRateLimited):
            await client.decrypt(blob, encryption_context=CONTEXT)
    assert remote.requests == 2
