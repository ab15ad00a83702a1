"""Rotation as an operator runs it, end to end on the moto KMS server: a message moved
from KMS key A to key B (and the KMS calls that cost), the ESDK reading the result
under B only, signed messages, and a scan of a partly rotated table by header alone.
"""

from __future__ import annotations

import pytest
from aws_encryption_sdk.exceptions import DecryptKeyError
from esdk_peer import esdk_decrypt, kms_master_keys
from kms_server import KmsKey, MotoKms
from moto_keyrings import KmsKeyringFactory
from rotation import (
    CONTEXT,
    PLAINTEXT,
    PUBLIC_KEY_FIELD,
    body,
    decrypt_with,
    edk_arns,
)
from suites import COMMIT, COMMIT_SIGN

import aioenvelope
from aioenvelope import (
    EnvelopeClient,
    errors,
    run_batch,
)

# ---------------------------------------------------------------------------------------
# 1. Acceptance: KMS key A to KMS key B, on moto
# ---------------------------------------------------------------------------------------


async def test_kms_reencrypt_moves_a_message_from_key_a_to_key_b(
    make_kms_keyring: KmsKeyringFactory, kms_key: KmsKey, kms_key_2: KmsKey
) -> None:
    key_a, key_b = make_kms_keyring(kms_key), make_kms_keyring(kms_key_2)
    async with EnvelopeClient(key_a, frame_length=64) as client:
        old = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        calls_before = dict(key_a.kms_calls)
        new = await client.reencrypt(old, to_keyring=key_b, encryption_context=CONTEXT)

        # One Decrypt under A, one GenerateDataKey under B, nothing else (B's
        # DescribeKey is its start-up check when it is opened on first use).
        assert key_a.kms_calls == {**calls_before, "Decrypt": 1}
        assert "Encrypt" not in key_a.kms_calls
        assert key_b.kms_calls == {"DescribeKey": 1, "GenerateDataKey": 1}
        # to_keyring reports to this client's counters too.
        assert client.stats.kms_calls["GenerateDataKey"] == 2  # A's for old, B's for new
        assert client.stats.kms_calls["Decrypt"] == 1

        # A second re-encryption of the same message: the old data key comes from the
        # decrypt cache, the new one from B's data-key cache (same context, same target):
        # no KMS call at all, yet a new message (new message ID, new frames).
        hits = client.stats.decrypt_cache_hits
        encrypt_hits = client.stats.encrypt_cache_hits
        again = await client.reencrypt(old, to_keyring=key_b)
        assert key_a.kms_calls == {**calls_before, "Decrypt": 1}
        assert key_b.kms_calls == {"DescribeKey": 1, "GenerateDataKey": 1}
        assert client.stats.decrypt_cache_hits == hits + 1
        assert client.stats.encrypt_cache_hits == encrypt_hits + 1

    old_header, new_header = aioenvelope.inspect(old), aioenvelope.inspect(new)
    again_header = aioenvelope.inspect(again)
    assert len({old_header.message_id, new_header.message_id, again_header.message_id}) == 3
    assert len(new_header.message_id) == 32
    assert body(new) != body(old)
    assert body(again) != body(new)
    assert new_header.algorithm_suite is old_header.algorithm_suite is COMMIT
    assert dict(new_header.encryption_context) == CONTEXT
    assert new_header.frame_length == 64
    assert edk_arns(old_header) == {kms_key.arn}
    assert edk_arns(new_header) == {kms_key_2.arn}
    # Both rotations of the message share B's cached data key; never A's.
    assert again_header.encrypted_data_keys == new_header.encrypted_data_keys
    assert set(new_header.encrypted_data_keys).isdisjoint(old_header.encrypted_data_keys)

    # The new message opens with B only, the old one (untouched) with A only.
    reader_b, reader_a = make_kms_keyring(kms_key_2), make_kms_keyring(kms_key)
    assert await decrypt_with(reader_b, new, CONTEXT) == PLAINTEXT
    assert await decrypt_with(make_kms_keyring(kms_key_2), again, CONTEXT) == PLAINTEXT
    with pytest.raises(errors.NoUsableKeyError):
        await decrypt_with(reader_a, new, CONTEXT)
    assert reader_a.kms_calls.get("Decrypt", 0) == 0  # no EDK names A: not even tried
    assert await decrypt_with(make_kms_keyring(kms_key), old, CONTEXT) == PLAINTEXT
    with pytest.raises(errors.NoUsableKeyError):
        await decrypt_with(make_kms_keyring(kms_key_2), old, CONTEXT)


async def test_esdk_decrypts_a_kms_reencrypted_message_under_key_b_only(
    esdk_kms: MotoKms, make_kms_keyring: KmsKeyringFactory, kms_key: KmsKey, kms_key_2: KmsKey
) -> None:
    async with EnvelopeClient(make_kms_keyring(kms_key), frame_length=64) as client:
        old = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        new = await client.reencrypt(old, to_keyring=make_kms_keyring(kms_key_2))
    provider_b = kms_master_keys(kms_key_2.arn)
    plaintext, peer_header = esdk_decrypt(provider_b, new)
    assert plaintext == PLAINTEXT
    assert peer_header.message_id == aioenvelope.inspect(new).message_id
    assert peer_header.message_id != aioenvelope.inspect(old).message_id
    assert peer_header.encryption_context == CONTEXT
    provider_a = kms_master_keys(kms_key.arn)
    with pytest.raises(DecryptKeyError):
        esdk_decrypt(provider_a, new)


async def test_kms_signed_message_reencrypts_to_a_signed_committing_message(
    esdk_kms: MotoKms, make_kms_keyring: KmsKeyringFactory, kms_key: KmsKey, kms_key_2: KmsKey
) -> None:
    """Signed messages are no longer refused: the old signature is verified, the new
    message is signed with a fresh key, and the ESDK reads it under B."""
    key_a, key_b = make_kms_keyring(kms_key), make_kms_keyring(kms_key_2)
    async with EnvelopeClient(key_a) as client:
        signed = await client.encrypt(
            PLAINTEXT, algorithm_suite=COMMIT_SIGN, encryption_context=CONTEXT
        )
        new = await client.reencrypt(signed, to_keyring=key_b)
        assert key_a.kms_calls["Decrypt"] == 1
        assert key_b.kms_calls == {"DescribeKey": 1, "GenerateDataKey": 1}
    header = aioenvelope.inspect(new)
    assert header.algorithm_suite is COMMIT_SIGN
    assert edk_arns(header) == {kms_key_2.arn}
    public_key = PUBLIC_KEY_FIELD
    assert (
        header.encryption_context[public_key]
        != (aioenvelope.inspect(signed).encryption_context[public_key])
    )
    assert await decrypt_with(make_kms_keyring(kms_key_2), new, CONTEXT) == PLAINTEXT
    provider_b = kms_master_keys(kms_key_2.arn)
    assert esdk_decrypt(provider_b, new)[0] == PLAINTEXT


# ---------------------------------------------------------------------------------------
# 3. Rotation as an operator runs it
# ---------------------------------------------------------------------------------------


async def test_operator_scan_finds_exactly_the_messages_still_under_key_a(
    make_kms_keyring: KmsKeyringFactory, kms_key: KmsKey, kms_key_2: KmsKey
) -> None:
    """Rotation as an operator runs it: re-encrypt part of a table, then scan every object's
    header (no key, no KMS call) for those still wrapped under the old key."""
    key_a, key_b = make_kms_keyring(kms_key), make_kms_keyring(kms_key_2)
    rotated = {1, 4, 5, 9, 13, 18}
    async with EnvelopeClient(key_a, frame_length=64) as client:
        table = [
            await client.encrypt(b"row %d" % i, encryption_context={"row": str(i)})
            for i in range(20)
        ]

        async def rotate(i: int) -> bytes:
            return await client.reencrypt(table[i], to_keyring=key_b)

        results = await run_batch(sorted(rotated), rotate, concurrency=4)
        assert all(r.ok for r in results)
        for result in results:
            assert result.value is not None
            table[result.item] = result.value

        calls_a, calls_b = dict(key_a.kms_calls), dict(key_b.kms_calls)
        still_under_a = {
            i
            for i, blob in enumerate(table)
            if kms_key.arn.encode()
            in {edk.provider_info for edk in aioenvelope.inspect(blob).encrypted_data_keys}
        }
        assert (key_a.kms_calls, key_b.kms_calls) == (calls_a, calls_b)
    assert still_under_a == set(range(20)) - rotated
    for i in rotated:
        assert await decrypt_with(make_kms_keyring(kms_key_2), table[i]) == b"row %d" % i
