"""Key rotation: ``reencrypt`` against decrypt + encrypt done by hand, ours and the ESDK's.

Rotation is re-encryption (a new header on the old body would need a second header tag
under the same key and IV): the old message is decrypted and verified to its end, then
sealed again under the new key with a new message ID. ``reencrypt`` should cost what
our own decrypt + encrypt costs (it is that, with the target's data-key cache), and the
ratio to the ESDK's decrypt + encrypt shows the gap per message (1 KiB) and in
throughput (16 MiB). Raw AES keys: no KMS in the timed part.

Separately, and untimed: the KMS calls for rotating N messages written with one
context (``ROTATED``, fewer in quick runs), on an embedded KMS (moto), with the default
cache, without data-key reuse and without a cache. They are checked against what the key
manager promises and printed above the table.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AsyncExitStack

from aioenvelope import CacheConfig, EnvelopeClient, KmsKeyring, RawAesKeyring, inspect
from aioenvelope.errors import ConfigurationError, NoUsableKeyError
from aioenvelope.testing import embedded_aws

from .common import KIB, MIB, BenchError, Case, Reference, Settings, Subject, check
from .esdk import ESDK_LABEL, EsdkReference
from .oneshot import CONTEXT, DEFAULT_SUITE, FRAME_LENGTH, NAMESPACE

__all__ = ["collect"]

OLD_NAME, NEW_NAME = "rotation-old", "rotation-new"
ROTATED, ROTATED_QUICK = 50, 10  # messages rotated over KMS for the call counts


def _expected(n: int) -> Mapping[str, tuple[dict[str, int], dict[str, int]]]:
    """KMS calls (old key, new key) for rotating ``n`` messages that share one data key,
    by cache setting: the old data key is read once while decryption is cached; the new
    key generates one data key for all while data keys are reused, else one each."""
    return {
        "CacheConfig()": ({"Decrypt": 1}, {"GenerateDataKey": 1}),
        "CacheConfig(reuse_data_keys=False)": ({"Decrypt": 1}, {"GenerateDataKey": n}),
        "cache=None": ({"Decrypt": n}, {"GenerateDataKey": n}),
    }


async def _check_rotation(
    client: EnvelopeClient, reader: EnvelopeClient, new_keyring: RawAesKeyring, message: bytes
) -> None:
    """Every subject's result is a new message the new key reads and the old cannot."""
    data = await client.decrypt(message, encryption_context=CONTEXT)
    new = await client.reencrypt(message, to_keyring=new_keyring)
    check(await reader.decrypt(new, encryption_context=CONTEXT) == data, "reencrypt lost data")
    check(inspect(new).message_id != inspect(message).message_id, "reencrypt kept the ID")
    check(
        {edk.provider_info[: len(NEW_NAME)] for edk in inspect(new).encrypted_data_keys}
        == {NEW_NAME.encode()},
        "reencrypt: the EDK is not the new key's",
    )
    try:
        await client.decrypt(new)
    except NoUsableKeyError:
        pass
    else:
        raise BenchError("reencrypt: the old key still reads the new message")


async def _kms_rotation_counts(stack: AsyncExitStack, n: int) -> list[str]:
    """Rotate ``n`` messages over the embedded KMS under each cache setting; the calls
    made under the old and the new key, checked against ``_expected``."""
    try:
        kms = stack.enter_context(embedded_aws())
    except ConfigurationError as exc:
        raise BenchError(f"{exc} (the rotation KMS count needs moto[server])") from exc
    old_arn = await kms.create_kms_key("bench-rotation-old")
    new_arn = await kms.create_kms_key("bench-rotation-new")
    session = kms.session()

    def keyring(arn: str) -> KmsKeyring:
        return KmsKeyring(
            arn, session=session, region_name=kms.region, endpoint_url=kms.endpoint_url
        )

    async with EnvelopeClient(keyring(old_arn)) as writer:
        messages = [
            await writer.encrypt(os.urandom(KIB), encryption_context=CONTEXT) for _ in range(n)
        ]
    expected = _expected(n)
    lines = [f"KMS calls for rotating {n} messages written with one context (moto):"]
    caches: Mapping[str, CacheConfig | None] = {
        "CacheConfig()": CacheConfig(),
        "CacheConfig(reuse_data_keys=False)": CacheConfig(reuse_data_keys=False),
        "cache=None": None,
    }
    for label, cache in caches.items():
        old_keyring, new_keyring = keyring(old_arn), keyring(new_arn)
        async with EnvelopeClient(old_keyring, cache=cache) as client:
            for message in messages:
                await client.reencrypt(message, to_keyring=new_keyring)
            calls = [
                {op: n for op, n in k.kms_calls.items() if op != "DescribeKey"}
                for k in (old_keyring, new_keyring)
            ]
        check(
            tuple(calls) == expected[label],
            f"rotating {n} messages with {label} made {calls}, expected {expected[label]}",
        )
        old_calls, new_calls = calls
        lines.append(
            f"  {label}: old key {old_calls}, new key {new_calls} "
            f"(+1 DescribeKey per key at start-up)"
        )
    return lines


def _report(lines: list[str]) -> None:
    print("\n".join(lines), flush=True)


async def collect(settings: Settings, stack: AsyncExitStack) -> list[Case]:
    """Cases for a 1 KiB and a 16 MiB message; every subject verified once first."""
    # Same cases in quick and full runs (only the timing is shorter); fewer messages for
    # the KMS call counts.
    rotated = ROTATED_QUICK if settings.quick else ROTATED
    old_key, new_key = os.urandom(32), os.urandom(32)
    client = await stack.enter_async_context(
        EnvelopeClient(RawAesKeyring(NAMESPACE, OLD_NAME, old_key), frame_length=FRAME_LENGTH)
    )
    new_keyring = RawAesKeyring(NAMESPACE, NEW_NAME, new_key)
    # Our decrypt + encrypt by hand: the encrypting client has the new key, so it has its
    # own data-key cache, as reencrypt's target has.
    writer = await stack.enter_async_context(
        EnvelopeClient(RawAesKeyring(NAMESPACE, NEW_NAME, new_key), frame_length=FRAME_LENGTH)
    )
    reader = writer
    esdk_old = EsdkReference(NAMESPACE, OLD_NAME, old_key)
    esdk_new = EsdkReference(NAMESPACE, NEW_NAME, new_key)
    cases: list[Case] = []
    for size, label, unit in ((KIB, "1 KiB", "msg/s"), (16 * MIB, "16 MiB", "MB/s")):
        data = os.urandom(size)
        message = await client.encrypt(data, encryption_context=CONTEXT)
        await _check_rotation(client, reader, new_keyring, message)

        async def by_hand_rotate(message: bytes = message) -> bytes:
            plaintext = await client.decrypt(message, encryption_context=CONTEXT)
            return await writer.encrypt(plaintext, encryption_context=CONTEXT)

        by_hand = await by_hand_rotate()
        check(await reader.decrypt(by_hand) == data, "decrypt + encrypt: cannot read it")

        def esdk_rotate(message: bytes = message) -> bytes:
            plaintext, _ = esdk_old.decrypt_with_header(message)
            return esdk_new.encrypt(
                plaintext,
                suite=DEFAULT_SUITE,
                encryption_context=CONTEXT,
                frame_length=FRAME_LENGTH,
            )

        check(await reader.decrypt(esdk_rotate()) == data, "ESDK rotation: cannot read it")

        async def reencrypt(n: int, message: bytes = message) -> None:
            for _ in range(n):
                await client.reencrypt(message, to_keyring=new_keyring)

        async def ours_by_hand(
            n: int, rotate: Callable[[], Awaitable[bytes]] = by_hand_rotate
        ) -> None:
            for _ in range(n):
                await rotate()

        async def esdk(n: int, rotate: Callable[[], bytes] = esdk_rotate) -> None:
            for _ in range(n):
                rotate()

        cases.append(
            Case(
                group=f"rotate {label} 0x0478",
                op="reencrypt",
                unit=unit,
                work_per_op=1.0 if unit == "msg/s" else size / 1e6,
                ours=Subject("aioenvelope reencrypt", reencrypt),
                references=(
                    Reference("aioenvelope decrypt + encrypt", ours_by_hand),
                    Reference(f"{ESDK_LABEL} decrypt + encrypt", esdk),
                ),
            )
        )
    stack.callback(_report, await _kms_rotation_counts(stack, rotated))
    return cases
