"""Key rotation: ``rewrap`` against re-encrypting, ours and the ESDK's.

A rewrap unwraps the data key (here a cache hit after the first message: the raw AES
keyring's unwrap is local anyway), wraps it under the new key and re-authenticates the
header; the body is copied, not decrypted. Re-encryption is what the ESDK offers for
rotation: decrypt under the old key, encrypt under the new one. The ratio shows what
not touching the body is worth, from 1 KiB (per-message overhead) to 16 MiB.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AsyncExitStack

from aioenvelope import EnvelopeClient, RawAesKeyring, inspect
from aioenvelope.format.header import parse_header

from .common import KIB, MIB, Case, Reference, Settings, Subject, check
from .esdk import ESDK_LABEL, EsdkReference
from .oneshot import CONTEXT, DEFAULT_SUITE, FRAME_LENGTH, NAMESPACE

__all__ = ["collect"]

OLD_NAME, NEW_NAME = "rotation-old", "rotation-new"


async def collect(settings: Settings, stack: AsyncExitStack) -> list[Case]:
    """Cases for a 1 KiB and a 16 MiB message; every subject verified once first."""
    del settings  # same cases in quick and full runs: only the timing is shorter
    old_key, new_key = os.urandom(32), os.urandom(32)
    client = await stack.enter_async_context(
        EnvelopeClient(RawAesKeyring(NAMESPACE, OLD_NAME, old_key), frame_length=FRAME_LENGTH)
    )
    new_keyring = RawAesKeyring(NAMESPACE, NEW_NAME, new_key)
    reader = await stack.enter_async_context(
        EnvelopeClient(RawAesKeyring(NAMESPACE, NEW_NAME, new_key), frame_length=FRAME_LENGTH)
    )
    esdk_old = EsdkReference(NAMESPACE, OLD_NAME, old_key)
    esdk_new = EsdkReference(NAMESPACE, NEW_NAME, new_key)
    cases: list[Case] = []
    for size, label, unit in ((KIB, "1 KiB", "msg/s"), (16 * MIB, "16 MiB", "MB/s")):
        data = os.urandom(size)
        message = await client.encrypt(data, encryption_context=CONTEXT)

        rewrapped = await client.rewrap(message, to_keyring=new_keyring)
        check(await reader.decrypt(rewrapped) == data, "rewrap: the new key cannot read it")
        old_header = parse_header(message, max_encrypted_data_keys=10).length
        new_header = parse_header(rewrapped, max_encrypted_data_keys=10).length
        check(rewrapped[new_header:] == message[old_header:], "rewrap changed the body")
        check(
            inspect(rewrapped).encrypted_data_keys[0].provider_info.startswith(NEW_NAME.encode()),
            "rewrap: the EDK is not the new key's",
        )
        reencrypted = await client.reencrypt_stream(message, to_keyring=new_keyring).read_all()
        check(await reader.decrypt(reencrypted) == data, "reencrypt: the new key cannot read it")

        def esdk_rotate(message: bytes = message) -> bytes:
            plaintext, _ = esdk_old.decrypt_with_header(message)
            return esdk_new.encrypt(
                plaintext,
                suite=DEFAULT_SUITE,
                encryption_context=CONTEXT,
                frame_length=FRAME_LENGTH,
            )

        check(await reader.decrypt(esdk_rotate()) == data, "ESDK rotation: cannot read it")

        async def rewrap(n: int, message: bytes = message) -> None:
            for _ in range(n):
                await client.rewrap(message, to_keyring=new_keyring)

        async def reencrypt(n: int, message: bytes = message) -> None:
            for _ in range(n):
                await client.reencrypt_stream(message, to_keyring=new_keyring).read_all()

        async def esdk(n: int, rotate: Callable[[], bytes] = esdk_rotate) -> None:
            for _ in range(n):
                rotate()

        cases.append(
            Case(
                group=f"rotate {label} 0x0478",
                op="rewrap",
                unit=unit,
                work_per_op=1.0 if unit == "msg/s" else size / 1e6,
                ours=Subject("aioenvelope rewrap", rewrap),
                references=(
                    Reference("aioenvelope reencrypt_stream", reencrypt),
                    Reference(f"{ESDK_LABEL} decrypt + encrypt", esdk),
                ),
            )
        )
    return cases
