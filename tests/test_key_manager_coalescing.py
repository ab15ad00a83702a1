"""Coalescing of concurrent key-manager misses, against a real moto KMS.

Identical misses share one KMS call: cancelling the request that started it or one that
waits on it, a deadline, an error, and closing the client must each do the right thing
to everyone else.
"""

from __future__ import annotations

import asyncio
import time

import anyio
import key_manager_support as support
import pytest
from key_manager_support import (
    CONTEXT,
    GatedKeyring,
    bogus_messages,
    encrypt_messages,
    payload,
)
from task_leaks import other_tasks, settle

from aioenvelope import (
    EnvelopeClient,
    KmsKeyring,
    errors,
)

# The support module's fixtures, for this module's tests.
keyring = support.keyring
reader_keyring = support.reader_keyring
gated_keyring = support.gated_keyring


# -- coalescing --------------------------------------------------------------------------


async def test_cancelling_the_request_that_started_a_miss_does_not_fail_the_waiters(
    keyring: KmsKeyring, gated_keyring: GatedKeyring
) -> None:
    """The shared call belongs to the client, not to the first caller: cancelling that
    caller (a client disconnect) must not fail or hang everyone coalesced on it."""
    (blob,) = await encrypt_messages(keyring, 1)
    async with EnvelopeClient(gated_keyring) as client:
        first = asyncio.create_task(client.decrypt(blob, encryption_context=CONTEXT))
        await asyncio.wait_for(gated_keyring.entered.wait(), 5)
        waiters = [
            asyncio.create_task(client.decrypt(blob, encryption_context=CONTEXT)) for _ in range(50)
        ]
        await settle(lambda: client.stats.coalesced_waits == 50, "50 coalesced waiters")
        first.cancel()
        await asyncio.wait([first])
        assert first.cancelled()
        gated_keyring.gate.set()
        results = await asyncio.wait_for(asyncio.gather(*waiters), 5)
    assert results == [payload(0)] * 50
    assert gated_keyring.calls == 1
    assert gated_keyring.kms_calls == {"Decrypt": 1}


async def test_cancelling_a_waiter_does_not_cancel_the_shared_call(
    keyring: KmsKeyring, gated_keyring: GatedKeyring
) -> None:
    """A waiter that gives up leaves the others (the starter included) unaffected."""
    (blob,) = await encrypt_messages(keyring, 1)
    async with EnvelopeClient(gated_keyring) as client:
        first = asyncio.create_task(client.decrypt(blob, encryption_context=CONTEXT))
        await asyncio.wait_for(gated_keyring.entered.wait(), 5)
        waiter = asyncio.create_task(client.decrypt(blob, encryption_context=CONTEXT))
        await settle(lambda: client.stats.coalesced_waits == 1, "one coalesced waiter")
        waiter.cancel()
        await asyncio.wait([waiter])
        gated_keyring.gate.set()
        assert await asyncio.wait_for(first, 5) == payload(0)
    assert waiter.cancelled()
    assert gated_keyring.kms_calls == {"Decrypt": 1}


async def test_deadline_on_the_request_that_started_a_miss_takes_effect_at_once(
    keyring: KmsKeyring, gated_keyring: GatedKeyring
) -> None:
    """The request's own deadline (an anyio cancel scope, as anyio-based servers and
    callers use) ends that request when it expires, not when the shared call ends."""
    (blob,) = await encrypt_messages(keyring, 1)
    async with EnvelopeClient(gated_keyring) as client:

        async def with_deadline() -> bool:
            with anyio.move_on_after(0.1) as scope:
                await client.decrypt(blob, encryption_context=CONTEXT)
            return scope.cancelled_caught

        started = time.monotonic()
        assert await asyncio.wait_for(with_deadline(), 2) is True
        assert time.monotonic() - started < 1.0
        gated_keyring.gate.set()
        assert await client.decrypt(blob, encryption_context=CONTEXT) == payload(0)


async def test_closing_the_client_leaves_no_abandoned_miss_running(
    keyring: KmsKeyring, gated_keyring: GatedKeyring
) -> None:
    """A shared call whose callers all left must end with the client that owns it, not
    linger as a pending task on the loop."""
    (blob,) = await encrypt_messages(keyring, 1)
    before = other_tasks()
    async with EnvelopeClient(gated_keyring) as client:
        request = asyncio.create_task(client.decrypt(blob, encryption_context=CONTEXT))
        await asyncio.wait_for(gated_keyring.entered.wait(), 5)
        request.cancel()
        await asyncio.wait([request])
    await asyncio.sleep(0)
    assert other_tasks() - before == set()
    assert gated_keyring.kms_calls == {}


async def test_keyring_error_reaches_every_concurrent_waiter(
    keyring: KmsKeyring, gated_keyring: GatedKeyring
) -> None:
    """One failed KMS Decrypt fails every request coalesced on it, with KMS's reason."""
    (bogus,) = bogus_messages((await encrypt_messages(keyring, 1))[0], 1)
    async with EnvelopeClient(gated_keyring) as client:
        tasks = [
            asyncio.create_task(client.decrypt(bogus, encryption_context=CONTEXT))
            for _ in range(50)
        ]
        await settle(lambda: client.stats.coalesced_waits == 49, "49 coalesced waiters")
        gated_keyring.gate.set()
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
    assert all(isinstance(o, errors.NoUsableKeyError) for o in outcomes)
    assert all("InvalidCiphertextException" in str(o) for o in outcomes)
    assert gated_keyring.kms_calls == {"Decrypt": 1}


async def test_keyring_error_is_not_cached(keyring: KmsKeyring, reader_keyring: KmsKeyring) -> None:
    """A failure is not remembered: retrying the same message asks KMS again (the fault
    may have been fixed, e.g. a grant added)."""
    (bogus,) = bogus_messages((await encrypt_messages(keyring, 1))[0], 1)
    async with EnvelopeClient(reader_keyring) as client:
        for _ in range(2):
            with pytest.raises(errors.NoUsableKeyError):
                await client.decrypt(bogus, encryption_context=CONTEXT)
    assert reader_keyring.kms_calls == {"Decrypt": 2}
