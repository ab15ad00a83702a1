"""What re-encryption costs and owns: KMS calls for a table rotated under each cache
setting (moto), data keys never shared between target keyrings, and the target
keyring's lifetime (opened once on first use, closed when the client exits, never left
open by a stream read after exit or a target still opening at exit).
"""

from __future__ import annotations

import os
from typing import Any

import anyio
import pytest
from kms_server import KmsKey, MotoKms
from moto_keyrings import KmsKeyringFactory
from rotation import (
    CONTEXT,
    NAMESPACE,
    PLAINTEXT,
    AesKey,
    XorKeyring,
    decrypt_with,
    edk_arns,
    encrypt_with,
)
from tracking_session import TrackingSession

import aioenvelope
from aioenvelope import (
    EnvelopeClient,
    RawAesKeyring,
    errors,
    run_batch,
)

ROWS = 50


async def rotate_rows(
    make_kms_keyring: KmsKeyringFactory,
    kms_key: KmsKey,
    kms_key_2: KmsKey,
    cache: aioenvelope.CacheConfig | None,
) -> tuple[dict[str, int], dict[str, int], list[bytes]]:
    """Write ROWS rows with one context under A (default cache: one reused data key),
    then rotate them all to B, concurrently, with a client configured with ``cache``.
    Returns A's and B's KMS calls during the rotation, and the rotated rows."""
    async with EnvelopeClient(make_kms_keyring(kms_key), frame_length=64) as writer:
        rows = [
            await writer.encrypt(b"row %d" % i, encryption_context=CONTEXT) for i in range(ROWS)
        ]
        assert writer.stats.kms_calls["GenerateDataKey"] == 1
    key_a, key_b = make_kms_keyring(kms_key), make_kms_keyring(kms_key_2)
    async with EnvelopeClient(key_a, frame_length=64, cache=cache) as client:
        before = dict(key_a.kms_calls)
        results = await run_batch(
            rows, lambda m: client.reencrypt(m, to_keyring=key_b), concurrency=8
        )
        assert all(r.ok for r in results)
        rotated = [r.value for r in results if r.value is not None]
        calls_a = {
            k: v - before.get(k, 0) for k, v in key_a.kms_calls.items() if v != before.get(k)
        }
        calls_b = dict(key_b.kms_calls)
    assert len(rotated) == ROWS
    assert len({aioenvelope.inspect(m).message_id for m in rotated}) == ROWS
    for old, new in zip(rows, rotated, strict=True):
        assert aioenvelope.inspect(new).message_id != aioenvelope.inspect(old).message_id
        assert edk_arns(aioenvelope.inspect(new)) == {kms_key_2.arn}
    return calls_a, calls_b, rotated


async def test_rotating_fifty_rows_that_share_a_data_key_costs_one_decrypt_and_one_generate(
    make_kms_keyring: KmsKeyringFactory, kms_key: KmsKey, kms_key_2: KmsKey
) -> None:
    """A table written with a reused data key rotates with one Decrypt under A (the old
    data key is cached, concurrent misses coalesced) and one GenerateDataKey under B
    (B's data key is cached and shared by every new message), with re-encryptions
    running concurrently; the new messages share EDKs, so reading them back under B is
    one Decrypt too."""
    calls_a, calls_b, rotated = await rotate_rows(
        make_kms_keyring, kms_key, kms_key_2, aioenvelope.CacheConfig()
    )
    assert calls_a == {"Decrypt": 1}
    assert calls_b == {"DescribeKey": 1, "GenerateDataKey": 1}
    assert len({aioenvelope.inspect(m).encrypted_data_keys for m in rotated}) == 1
    reader = make_kms_keyring(kms_key_2)
    async with EnvelopeClient(reader) as client_b:
        for i, message in enumerate(rotated):
            assert await client_b.decrypt(message, encryption_context=CONTEXT) == b"row %d" % i
    assert reader.kms_calls.get("Decrypt", 0) == 1


async def test_without_data_key_reuse_every_reencryption_generates_its_own_data_key(
    make_kms_keyring: KmsKeyringFactory, kms_key: KmsKey, kms_key_2: KmsKey
) -> None:
    """``reuse_data_keys=False`` asks for a KMS call per written message (a per-object
    audit trail): re-encryption honours it (one GenerateDataKey under B per message),
    while the old data key is still read once (decryption stays cached)."""
    config = aioenvelope.CacheConfig(reuse_data_keys=False)
    calls_a, calls_b, rotated = await rotate_rows(make_kms_keyring, kms_key, kms_key_2, config)
    assert calls_a == {"Decrypt": 1}
    assert calls_b == {"DescribeKey": 1, "GenerateDataKey": ROWS}
    assert len({aioenvelope.inspect(m).encrypted_data_keys for m in rotated}) == ROWS


async def test_without_a_cache_every_reencryption_costs_a_decrypt_and_a_generate(
    make_kms_keyring: KmsKeyringFactory, kms_key: KmsKey, kms_key_2: KmsKey
) -> None:
    calls_a, calls_b, rotated = await rotate_rows(make_kms_keyring, kms_key, kms_key_2, None)
    assert calls_a == {"Decrypt": ROWS}
    assert calls_b == {"DescribeKey": 1, "GenerateDataKey": ROWS}
    assert len({aioenvelope.inspect(m).encrypted_data_keys for m in rotated}) == ROWS


async def test_data_keys_are_not_shared_between_target_keyrings(
    make_kms_keyring: KmsKeyringFactory, kms_key: KmsKey, kms_key_2: KmsKey, moto_kms: MotoKms
) -> None:
    """Two targets with the same key name but different key material: each has a
    data-key cache of its own (keyed by the target keyring object, never its name)."""
    target_1 = RawAesKeyring(NAMESPACE, "same-name", os.urandom(32))
    target_2 = RawAesKeyring(NAMESPACE, "same-name", os.urandom(32))
    async with EnvelopeClient(make_kms_keyring(kms_key), frame_length=64) as client:
        old = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        one = await client.reencrypt(old, to_keyring=target_1)
        two = await client.reencrypt(old, to_keyring=target_2)
    assert set(aioenvelope.inspect(one).encrypted_data_keys).isdisjoint(
        aioenvelope.inspect(two).encrypted_data_keys
    )
    async with EnvelopeClient(target_2) as reader:
        assert await reader.decrypt(two) == PLAINTEXT
        with pytest.raises(errors.NoUsableKeyError):
            await reader.decrypt(one)


# ---------------------------------------------------------------------------------------
# 8. The target keyring's lifetime belongs to the client
# ---------------------------------------------------------------------------------------


async def test_to_keyring_is_opened_once_across_many_reencryptions_and_closed_on_exit() -> None:
    source = XorKeyring("a")
    target = XorKeyring("b", open_delay=0.01)  # concurrent first uses overlap its open()
    messages = [await encrypt_with(source, b"m%d" % i) for i in range(12)]
    source.closed = 0
    async with EnvelopeClient(source) as client:
        results: list[bytes] = [b""] * len(messages)

        async def one(i: int) -> None:
            results[i] = await client.reencrypt(messages[i], to_keyring=target)

        async with anyio.create_task_group() as tg:
            for i in range(len(messages)):
                tg.start_soon(one, i)
        for message in messages:
            await client.reencrypt(message, to_keyring=target)
        await client.reencrypt_stream(messages[0], to_keyring=target).read_all()
        assert (target.attached, target.opened, target.closed) == (1, 1, 0)
        # One context, so one data key of the target, made once (concurrent misses
        # coalesced) and reused by the other 24 messages; each old message had its own
        # data key: 12 unwraps, the second round from the decrypt cache.
        assert target.wrapped == 1
        assert source.unwrapped == len(messages)
    assert (target.attached, target.opened, target.closed) == (1, 1, 1)
    assert source.closed == 1
    for i, result in enumerate(results):
        assert await decrypt_with(XorKeyring("b"), result) == b"m%d" % i


async def test_own_keyring_as_target_is_neither_reopened_nor_closed_twice() -> None:
    own = XorKeyring("a")
    message = await encrypt_with(own)
    own.opened = own.closed = 0
    async with EnvelopeClient(own) as client:
        await client.reencrypt(message, to_keyring=own)
    assert (own.opened, own.closed) == (1, 1)


async def test_kms_to_keyring_client_is_opened_once_and_closed_when_the_client_exits(
    moto_kms: MotoKms, make_kms_keyring: KmsKeyringFactory, kms_key: KmsKey, kms_key_2: KmsKey
) -> None:
    tracking = TrackingSession()
    key_a = make_kms_keyring(kms_key)
    key_b = make_kms_keyring(kms_key_2, session=tracking.session)
    async with EnvelopeClient(key_a, frame_length=64) as client:
        messages = [await client.encrypt(b"m%d" % i, encryption_context=CONTEXT) for i in range(5)]
        assert tracking.events == []  # not opened until first used
        for message in messages:
            await client.reencrypt(message, to_keyring=key_b)
        assert [kind for kind, _ in tracking.events] == ["open"]
        assert key_b.kms_calls == {"DescribeKey": 1, "GenerateDataKey": 1}  # one data key
    assert [kind for kind, _ in tracking.events] == ["open", "close"]
    assert tracking.open_clients == 0


async def test_reencrypt_needs_an_open_client_and_a_keyring(tmp_path: Any) -> None:
    key_a = AesKey("a")
    message = await encrypt_with(key_a.keyring())
    client = EnvelopeClient(key_a.keyring())
    with pytest.raises(errors.ConfigurationError, match="not open"):
        await client.reencrypt(message, to_keyring=AesKey("b").keyring())
    async with client:
        with pytest.raises(errors.ConfigurationError, match="to_keyring"):
            await client.reencrypt(message, to_keyring=object())  # type: ignore[arg-type]
        with pytest.raises(errors.ConfigurationError, match="bytes-like"):
            await client.reencrypt("text", to_keyring=AesKey("b").keyring())  # type: ignore[arg-type]
    target = XorKeyring("b")
    with pytest.raises(errors.ConfigurationError, match="closed"):
        await client.reencrypt(message, to_keyring=target)
    with pytest.raises(errors.ConfigurationError, match="closed"):
        client.reencrypt_stream(message, to_keyring=target)
    (tmp_path / "c").write_bytes(message)
    with pytest.raises(errors.ConfigurationError, match="closed"):
        await client.reencrypt_file(tmp_path / "c", tmp_path / "r", to_keyring=target)
    assert [p.name for p in tmp_path.iterdir()] == ["c"]
    assert (target.attached, target.opened, target.wrapped) == (0, 0, 0)


async def test_a_stream_read_after_the_client_exits_leaves_no_keyring_open() -> None:
    """``to_keyring`` is closed when the client exits. A stream made while the client
    was open but read after it exited must not open the keyring then (it would never
    be closed): it fails, saying the client is closed, and the target was never opened."""
    source = XorKeyring("a")
    message = await encrypt_with(source)
    target = XorKeyring("b")
    async with EnvelopeClient(source) as client:
        stream = client.reencrypt_stream(message, to_keyring=target)
    with pytest.raises(errors.ConfigurationError, match=r"^the EnvelopeClient is closed"):
        async with stream:
            await stream.read_all()
    assert target.opened == target.closed
    assert (target.attached, target.opened, target.wrapped) == (0, 0, 0)


async def test_a_kms_to_keyring_first_used_after_the_client_exits_is_not_left_open(
    make_kms_keyring: KmsKeyringFactory, kms_key: KmsKey, kms_key_2: KmsKey
) -> None:
    """The same with KMS: reading after exit fails (the client's own KMS keyring is
    closed), but must not open B's aiobotocore client on the way and leave it open."""
    tracking = TrackingSession()
    key_b = make_kms_keyring(kms_key_2, session=tracking.session)
    async with EnvelopeClient(make_kms_keyring(kms_key)) as client:
        message = await client.encrypt(PLAINTEXT)
        stream = client.reencrypt_stream(message, to_keyring=key_b)
    try:
        # The client's own KMS keyring, closed with the client, refuses first.
        with pytest.raises(errors.ConfigurationError, match=r"^the KMS keyring is not open"):
            await stream.read_all()
        assert tracking.open_clients == 0
        assert tracking.events == []  # B's KMS client was never even made
    finally:
        await key_b.close()  # do not leak the client into other tests either way


async def test_a_target_opened_while_the_client_exits_is_closed_and_the_call_refused() -> None:
    """A re-encryption whose target was still opening when the client exited: the
    target is closed (nothing else would close it) and the call fails, instead of a
    target left open and a data key cached after the client's caches were wiped."""
    source = XorKeyring("a")
    message = await encrypt_with(source)
    target = XorKeyring("b", open_delay=0.2)
    outcome: list[object] = []

    async def rotate(client: EnvelopeClient) -> None:
        try:
            outcome.append(await client.reencrypt(message, to_keyring=target))
        except errors.ConfigurationError as exc:
            outcome.append(exc)

    async with anyio.create_task_group() as tg, EnvelopeClient(source) as client:
        tg.start_soon(rotate, client)
        await anyio.sleep(0.05)  # the target's open() has started
    assert (target.opened, target.closed) == (1, 1)
    assert len(outcome) == 1
    assert isinstance(outcome[0], errors.ConfigurationError)
    assert "closed" in str(outcome[0])


class FailingToClose(XorKeyring):
    async def close(self) -> None:
        await super().close()
        raise errors.KeyringError("the key service did not answer the close")


async def test_a_target_that_fails_to_close_does_not_keep_the_others_open() -> None:
    source, broken, other = XorKeyring("a"), FailingToClose("b"), XorKeyring("c")
    message = await encrypt_with(source)

    async def rotate_to_both() -> None:
        async with EnvelopeClient(source) as client:
            await client.reencrypt(message, to_keyring=broken)
            await client.reencrypt(message, to_keyring=other)

    with pytest.raises(errors.KeyringError, match="did not answer the close"):
        await rotate_to_both()
    # source: once more by encrypt_with's own client
    assert [(k.opened, k.closed) for k in (source, broken, other)] == [(2, 2), (1, 1), (1, 1)]
