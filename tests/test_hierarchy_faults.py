"""The hierarchical keyring under faults: DynamoDB and KMS throttling, 5xx, a hung table,
the circuit breaker and the decrypt rate limit, end to end.

moto never misbehaves, so :class:`fault_proxy.FaultProxy` sits between the branch key
store and moto (DynamoDB and KMS share its endpoint) and throttles, fails or holds
requests on demand, in each service's own error format; botocore's real retry logic
answers them. Everything goes through the public API: an ``EnvelopeClient`` over a
``HierarchicalKeyring`` over a ``BranchKeyStore``. What reached the services is read from
the proxy (attempts) and from ``store.calls`` / ``client.stats`` (calls as the library
made them: one per operation, retries inside).

Branch keys are made straight on moto (no proxy), and so are the messages to decrypt
("writer" clients), so only the client under test meets the faults. A cold client's
first encrypt fetches the active version (1 GetItem + 1 KMS Decrypt); decrypting a
message under an older version fetches that version: a cache miss on demand.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import pytest
from fake_clock import FakeClock
from fault_proxy import FaultProxy, wait_for
from kms_server import REGION
from task_leaks import other_tasks

from aioenvelope import (
    BranchKeyStore,
    EnvelopeClient,
    HierarchicalKeyring,
    MultiKeyring,
    RateLimit,
    RawAesKeyring,
    errors,
)

StoreFactory = Callable[..., BranchKeyStore]

PLAINTEXT = b"a record under its own context"
# Long enough that botocore's jittered backoff (up to 1 s, 2 s, 4 s before attempts 2, 3,
# 4) never meets it, so the retry tests test retries and not the deadline.
RETRY_DEADLINE = 30.0
# The deadline of the tests that meet it: a hung table, a persistent fault.
SHORT_DEADLINE = 1.0
# "Not later than the deadline": slack for a loaded CI box, not a performance figure.
# Without the deadline, a hung GetItem costs botocore's read timeout (the deadline) per
# attempt, 4 attempts: 4 s here.
DEADLINE_SLACK = 1.5
THRESHOLD = 5  # CircuitBreakerConfig's default failure_threshold
RESET_TIMEOUT = 30.0  # and reset_timeout
DDB_THROTTLED = "ProvisionedThroughputExceededException"


def context(i: int | str) -> dict[str, str]:
    """A per-record encryption context: what this keyring makes cheap."""
    return {"record": str(i)}


def proxied(
    make_branch_key_store: StoreFactory, proxy: FaultProxy, **kwargs: Any
) -> BranchKeyStore:
    """A store on the test's table that reaches DynamoDB and KMS through ``proxy``."""
    kwargs.setdefault("deadline", RETRY_DEADLINE)
    return make_branch_key_store(endpoint_url=proxy.url, **kwargs)


async def messages_under_versions(
    make_branch_key_store: StoreFactory, branch_key_id: str, count: int
) -> list[bytes]:
    """``count`` messages, each under its own version of the branch key (rotated between
    them through the writer's store, which moves its keyring on at once), made straight
    on moto. The last is under the version active when this returns."""
    writer_store = make_branch_key_store()
    messages = []
    async with EnvelopeClient(
        HierarchicalKeyring(writer_store, branch_key_id=branch_key_id)
    ) as writer:
        for i in range(count):
            if i:
                await writer_store.rotate_branch_key(branch_key_id)
            messages.append(await writer.encrypt(PLAINTEXT, encryption_context=context(i)))
    return messages


def sent(proxy: FaultProxy) -> int:
    """Requests the proxy has received so far, DynamoDB's and KMS's."""
    return sum(proxy.requests().values())


def inject(proxy: FaultProxy, fault: str, n: int) -> None:
    """The next ``n`` requests of one operation fail transiently, as its service fails."""
    if fault == "dynamodb-throttled":
        proxy.dynamodb_error_next(n, DDB_THROTTLED, operation="GetItem")
    elif fault == "dynamodb-throttling":
        proxy.dynamodb_error_next(
            n, "com.amazon.coral.availability#ThrottlingException", operation="GetItem"
        )
    elif fault == "dynamodb-500":
        proxy.dynamodb_error_next(n, "InternalServerError", 500, operation="GetItem")
    elif fault == "dynamodb-503":
        proxy.dynamodb_error_next(n, "ServiceUnavailable", 503, operation="GetItem")
    elif fault == "kms-throttling":
        proxy.throttle_next(n, operation="Decrypt")
    elif fault == "kms-500":
        proxy.fail_next(n, 500, operation="Decrypt")
    else:
        raise AssertionError(fault)


DYNAMODB_FAULTS = ["dynamodb-throttled", "dynamodb-throttling", "dynamodb-500", "dynamodb-503"]
KMS_FAULTS = ["kms-throttling", "kms-500"]


# ---------------------------------------------------------------------------------------
# Retries: botocore retries inside the deadline, we count one call
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", DYNAMODB_FAULTS + KMS_FAULTS)
async def test_a_throttled_or_failing_branch_key_fetch_is_retried_until_it_succeeds(
    make_branch_key_store: StoreFactory,
    branch_keys: tuple[str, str],
    fault_proxy: FaultProxy,
    fault: str,
) -> None:
    """Throttling (DynamoDB's ProvisionedThroughputExceeded and ThrottlingException, KMS's
    ThrottlingException) and 5xx are a busy service's normal answers: botocore absorbs
    them and the caller sees a working encrypt. The proxy saw the retry; the store and the
    client's stats count one call of each operation, as a bill or a quota would."""
    store = proxied(make_branch_key_store, fault_proxy)
    inject(fault_proxy, fault, 1)
    async with EnvelopeClient(HierarchicalKeyring(store, branch_key_id=branch_keys[0])) as client:
        message = await client.encrypt(PLAINTEXT, encryption_context=context(1))
        assert await client.decrypt(message) == PLAINTEXT  # the encrypt warmed it
        stats = client.stats
    retried = "GetItem" if fault.startswith("dynamodb") else "Decrypt"
    other = "Decrypt" if retried == "GetItem" else "GetItem"
    assert fault_proxy.requests() == {retried: 2, other: 1}
    assert store.calls == {"GetItem": 1, "Decrypt": 1}
    assert dict(stats.dynamodb_calls) == {"GetItem": 1}
    assert dict(stats.kms_calls) == {"Decrypt": 1}


@pytest.mark.parametrize("fault", ["dynamodb-throttled", "kms-throttling"])
async def test_max_attempts_bounds_the_attempts_of_the_stores_calls(
    make_branch_key_store: StoreFactory,
    branch_keys: tuple[str, str],
    fault_proxy: FaultProxy,
    fault: str,
) -> None:
    """``max_attempts`` counts attempts, the first included, for both services, as
    ``KmsKeyring``'s does: a fault that outlasts them is the service's own error code,
    transient, after exactly that many requests."""
    store = proxied(make_branch_key_store, fault_proxy, max_attempts=2)
    inject(fault_proxy, fault, 100)
    async with EnvelopeClient(HierarchicalKeyring(store, branch_key_id=branch_keys[0])) as client:
        with pytest.raises(errors.KeyServiceError) as info:
            await client.encrypt(PLAINTEXT, encryption_context=context(1))
    if fault.startswith("dynamodb"):
        assert isinstance(info.value, errors.DynamoDBError)
        assert info.value.error_code == DDB_THROTTLED
        assert fault_proxy.requests() == {"GetItem": 2}
    else:
        assert isinstance(info.value, errors.KMSError)
        assert info.value.error_code == "ThrottlingException"
        assert fault_proxy.requests() == {"GetItem": 1, "Decrypt": 2}
    assert info.value.transient is True


# ---------------------------------------------------------------------------------------
# Persistent faults and a hung table: a library error at the deadline
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["dynamodb-throttled", "dynamodb-500", *KMS_FAULTS])
async def test_a_persistent_fault_is_a_transient_key_service_error_within_the_deadline(
    make_branch_key_store: StoreFactory,
    branch_keys: tuple[str, str],
    fault_proxy: FaultProxy,
    fault: str,
) -> None:
    """With botocore's default 4 attempts, backoff alone (up to 1 + 2 + 4 s) would
    outlast a 1 s deadline: the deadline still holds, retries included. The caller gets
    one library error that says which service, which call and that it is transient
    (worth retrying later): the throttling code if the attempts ran out first, "Timeout"
    if the deadline came first."""
    store = proxied(make_branch_key_store, fault_proxy, deadline=SHORT_DEADLINE)
    inject(fault_proxy, fault, 100)
    async with EnvelopeClient(HierarchicalKeyring(store, branch_key_id=branch_keys[0])) as client:
        started = time.monotonic()
        with pytest.raises(errors.KeyServiceError) as info:
            await client.encrypt(PLAINTEXT, encryption_context=context(1))
        elapsed = time.monotonic() - started
    error = info.value
    assert elapsed < SHORT_DEADLINE + DEADLINE_SLACK
    assert error.transient is True
    if fault.startswith("dynamodb"):
        assert type(error) is errors.DynamoDBError
        assert (error.service, error.operation) == ("dynamodb", "GetItem")
        assert error.key_id == store.table_name
        assert error.error_code in {"Timeout", DDB_THROTTLED, "InternalServerError"}
        assert 1 <= fault_proxy.requests()["GetItem"] <= 4
        assert "Decrypt" not in fault_proxy.requests()
    else:
        assert isinstance(error, errors.KMSError)
        assert (error.service, error.operation) == ("aws-kms", "Decrypt")
        assert error.key_id == store.kms_key_id
        assert error.error_code in {"Timeout", "ThrottlingException", "KMSInternalException"}
        assert 1 <= fault_proxy.requests()["Decrypt"] <= 4
    assert error.operation in str(error)


async def test_a_hung_dynamodb_fails_at_the_deadline_and_the_client_stays_usable(
    make_branch_key_store: StoreFactory, branch_keys: tuple[str, str], fault_proxy: FaultProxy
) -> None:
    """A table that accepts a request and never answers costs the caller the deadline,
    not botocore's read timeout once per attempt; the abandoned request leaves no task
    behind, and the same client works once DynamoDB answers again."""
    before = other_tasks()
    store = proxied(make_branch_key_store, fault_proxy, deadline=SHORT_DEADLINE)
    async with EnvelopeClient(HierarchicalKeyring(store, branch_key_id=branch_keys[0])) as client:
        fault_proxy.hang(True)
        try:
            started = time.monotonic()
            with pytest.raises(errors.DynamoDBError) as info:
                await client.encrypt(PLAINTEXT, encryption_context=context(1))
            elapsed = time.monotonic() - started
            assert other_tasks() - before == set()
        finally:
            fault_proxy.hang(False)
        message = await client.encrypt(PLAINTEXT, encryption_context=context(2))
        assert await client.decrypt(message) == PLAINTEXT
    assert elapsed < SHORT_DEADLINE + DEADLINE_SLACK
    error = info.value
    assert (error.error_code, error.transient) == ("Timeout", True)
    assert (error.service, error.operation, error.key_id) == (
        "dynamodb",
        "GetItem",
        store.table_name,
    )
    assert str(error) == (
        f"DynamoDB GetItem on table {store.table_name} did not finish within "
        f"{SHORT_DEADLINE:g} s (retries included)"
    )
    assert other_tasks() - before == set()


# ---------------------------------------------------------------------------------------
# The circuit breaker: DynamoDB and KMS failures count, cache hits keep working
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fault", "service"), [("dynamodb-500", "DynamoDB"), ("kms-500", "KMS")])
async def test_five_failed_fetches_open_the_breaker_and_cache_hits_keep_working(
    make_branch_key_store: StoreFactory,
    branch_keys: tuple[str, str],
    fault_proxy: FaultProxy,
    fault: str,
    service: str,
) -> None:
    """Five fetches in a row that fail transiently, on DynamoDB's side or on KMS's (a
    KMS outage behind a healthy table counts too: the GetItems that succeed say nothing
    about KMS), open the region's breaker: the next fetch fails fast without a request,
    with an error naming the service that failed. Encrypting under the warm active key
    and decrypting under a cached version need no remote call and keep working. After
    the reset timeout (the client's clock, moved by hand) one probe closes it."""
    old, current = await messages_under_versions(make_branch_key_store, branch_keys[0], 2)
    clock = FakeClock()
    store = proxied(make_branch_key_store, fault_proxy, max_attempts=1)
    keyring = HierarchicalKeyring(store, branch_key_id=branch_keys[0])
    async with EnvelopeClient(keyring, clock=clock) as client:
        warm = await client.encrypt(PLAINTEXT, encryption_context=context("warm"))
        inject(fault_proxy, fault, THRESHOLD)
        for _ in range(THRESHOLD):
            with pytest.raises(errors.KeyServiceError) as failed:
                await client.decrypt(old)  # its version is not cached: a fetch
            assert failed.value.transient is True
        assert client.stats.breaker_states[REGION] == "open"
        before = sent(fault_proxy)

        with pytest.raises(errors.CircuitOpenError) as refused:
            await client.decrypt(old)
        assert sent(fault_proxy) == before
        assert refused.value.region == REGION
        assert refused.value.retry_after == pytest.approx(RESET_TIMEOUT)
        assert str(refused.value).startswith(
            f"{service} in {REGION} failed {THRESHOLD} times in a row; "
        ), str(refused.value)

        fresh = await client.encrypt(PLAINTEXT, encryption_context=context("while open"))
        assert await client.decrypt(fresh) == PLAINTEXT
        assert await client.decrypt(current) == PLAINTEXT
        assert await client.decrypt(warm) == PLAINTEXT
        assert sent(fault_proxy) == before

        clock.advance(RESET_TIMEOUT)
        assert await client.decrypt(old) == PLAINTEXT  # the probe, and the fetch
        assert client.stats.breaker_states[REGION] == "closed"
        assert sent(fault_proxy) == before + 2  # one GetItem, one Decrypt


async def test_a_probe_that_finds_kms_still_failing_reopens_the_breaker_at_once(
    make_branch_key_store: StoreFactory, branch_keys: tuple[str, str], fault_proxy: FaultProxy
) -> None:
    """A fetch's first call is its GetItem, so the probe after an outage of KMS reaches
    DynamoDB, which answers: that closes the breaker for the fetch's Decrypt to be tried,
    but KMS, the service that opened it, is on probation: one more failure reopens it
    (not five more fetches, each paying a GetItem)."""
    (old, _) = await messages_under_versions(make_branch_key_store, branch_keys[0], 2)
    clock = FakeClock()
    store = proxied(make_branch_key_store, fault_proxy, max_attempts=1)
    keyring = HierarchicalKeyring(store, branch_key_id=branch_keys[0])
    async with EnvelopeClient(keyring, clock=clock) as client:
        inject(fault_proxy, "kms-500", THRESHOLD + 1)
        for _ in range(THRESHOLD):
            with pytest.raises(errors.KMSError):
                await client.decrypt(old)
        assert client.stats.breaker_states[REGION] == "open"
        clock.advance(RESET_TIMEOUT)
        with pytest.raises(errors.KMSError) as probe:
            await client.decrypt(old)
        assert probe.value.transient is True
        assert client.stats.breaker_states[REGION] == "open"
        before = sent(fault_proxy)
        with pytest.raises(errors.CircuitOpenError):
            await client.decrypt(old)
        assert sent(fault_proxy) == before
        clock.advance(RESET_TIMEOUT)
        assert await client.decrypt(old) == PLAINTEXT
        assert client.stats.breaker_states[REGION] == "closed"


async def test_callers_sharing_a_failed_fetch_all_get_its_error_and_it_counts_once(
    make_branch_key_store: StoreFactory, branch_keys: tuple[str, str], fault_proxy: FaultProxy
) -> None:
    """Concurrent first uses wait on one fetch; when it fails, each of them gets the
    library error, and the breaker hears of one failed call, not one per caller (a burst
    of callers during a blip must not open it)."""
    store = proxied(make_branch_key_store, fault_proxy, max_attempts=1)
    inject(fault_proxy, "dynamodb-500", 1)
    async with EnvelopeClient(HierarchicalKeyring(store, branch_key_id=branch_keys[0])) as client:
        outcomes = await asyncio.gather(
            *(client.encrypt(PLAINTEXT, encryption_context=context(i)) for i in range(50)),
            return_exceptions=True,
        )
        assert all(isinstance(o, errors.DynamoDBError) and o.transient for o in outcomes)
        assert fault_proxy.requests() == {"GetItem": 1}
        for i in range(THRESHOLD - 2):  # with the shared failure: one short of opening
            inject(fault_proxy, "dynamodb-500", 1)
            with pytest.raises(errors.DynamoDBError):
                await client.encrypt(PLAINTEXT, encryption_context=context(i))
        assert client.stats.breaker_states[REGION] == "closed"
        message = await client.encrypt(PLAINTEXT, encryption_context=context("after"))
        assert await client.decrypt(message) == PLAINTEXT


@pytest.mark.parametrize("answer", ["kms-access-denied", "missing-branch-key"])
async def test_answered_errors_are_not_counted_by_the_breaker(
    make_branch_key_store: StoreFactory,
    branch_keys: tuple[str, str],
    fault_proxy: FaultProxy,
    answer: str,
) -> None:
    """AccessDenied on KMS Decrypt and a branch key that is not in the table are
    answers: the service is up. They never open the breaker however many come, and one
    between transient failures of the same service ends their run."""
    (old, _) = await messages_under_versions(make_branch_key_store, branch_keys[0], 2)
    store = proxied(make_branch_key_store, fault_proxy, max_attempts=1)

    def branch_key_for(ctx: Mapping[str, str]) -> str:
        return ctx.get("tenant", branch_keys[0])

    keyring = HierarchicalKeyring(store, branch_key_id_supplier=branch_key_for)
    fault = "kms-500" if answer == "kms-access-denied" else "dynamodb-500"

    async with EnvelopeClient(keyring) as client:

        async def answered() -> None:
            if answer == "kms-access-denied":
                fault_proxy.refuse_next(1, "AccessDeniedException", operation="Decrypt")
                with pytest.raises(errors.KMSError) as info:
                    await client.decrypt(old)
                assert (info.value.error_code, info.value.transient) == (
                    "AccessDeniedException",
                    False,
                )
            else:
                with pytest.raises(errors.BranchKeyNotFoundError):
                    await client.encrypt(PLAINTEXT, encryption_context={"tenant": "nobody"})

        async def failed() -> None:
            inject(fault_proxy, fault, 1)
            with pytest.raises(errors.KeyServiceError) as info:
                await client.decrypt(old)
            assert info.value.transient is True

        for _ in range(THRESHOLD + 1):
            await answered()
        for _ in range(THRESHOLD - 1):
            await failed()
        await answered()
        for _ in range(THRESHOLD - 1):
            await failed()
        assert client.stats.breaker_states[REGION] == "closed"
        assert client.stats.breaker_transitions == 0
        assert await client.decrypt(old) == PLAINTEXT


# ---------------------------------------------------------------------------------------
# The decrypt rate limit: one token per cache-miss fetch
# ---------------------------------------------------------------------------------------


async def test_the_decrypt_rate_limit_charges_branch_key_fetches_and_not_cache_hits(
    make_branch_key_store: StoreFactory, branch_keys: tuple[str, str], fault_proxy: FaultProxy
) -> None:
    """A branch key fetch is a remote unwrap (its KMS Decrypt), so it takes a token of
    ``decrypt_rate_limit``, before its GetItem: with a bucket of 3, three uncached
    versions are fetched, the fourth is refused without any request, and messages under
    the versions already cached keep decrypting for free. The clock (frozen, moved by
    hand) refills it."""
    burst = 3
    messages = await messages_under_versions(make_branch_key_store, branch_keys[0], burst + 1)
    clock = FakeClock()
    store = proxied(make_branch_key_store, fault_proxy)
    async with EnvelopeClient(
        HierarchicalKeyring(store, branch_key_id=branch_keys[0]),
        decrypt_rate_limit=RateLimit(rate=1.0, burst=burst),
        clock=clock,
    ) as client:
        for message in messages[:burst]:
            assert await client.decrypt(message) == PLAINTEXT
        assert fault_proxy.requests() == {"GetItem": burst, "Decrypt": burst}
        for message in messages[:burst]:
            assert await client.decrypt(message) == PLAINTEXT  # cache hits: no token
        with pytest.raises(errors.KMSDecryptRateLimited) as info:
            await client.decrypt(messages[burst])
        assert info.value.retry_after == pytest.approx(1.0)
        assert fault_proxy.requests() == {"GetItem": burst, "Decrypt": burst}
        stats = client.stats
        assert (stats.branch_key_cache_hits, stats.branch_key_cache_misses) == (burst, burst + 1)
        assert dict(stats.dynamodb_calls) == {"GetItem": burst}

        clock.advance(1.0)
        assert await client.decrypt(messages[burst]) == PLAINTEXT
    assert store.calls == {"GetItem": burst + 1, "Decrypt": burst + 1}


# ---------------------------------------------------------------------------------------
# What the logs say
# ---------------------------------------------------------------------------------------


async def test_closing_the_client_logs_each_service_client_by_its_name(
    make_branch_key_store: StoreFactory,
    branch_keys: tuple[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An operator reading the debug log must see the DynamoDB client closed as such,
    not as a second KMS client."""
    caplog.set_level(logging.DEBUG, logger="aioenvelope.kms")
    store = make_branch_key_store()
    async with EnvelopeClient(HierarchicalKeyring(store, branch_key_id=branch_keys[0])) as client:
        await client.encrypt(PLAINTEXT, encryption_context=context(1))
        caplog.clear()
    closing = sorted(r.getMessage() for r in caplog.records if "closing" in r.getMessage())
    assert closing == [
        f"closing the DynamoDB client for region {REGION}",
        f"closing the KMS client for region {REGION}",
    ]


# ---------------------------------------------------------------------------------------
# One probe, and only the probe closes the breaker (found by review: late answers and a
# probe fetch's GetItem used to close it)
# ---------------------------------------------------------------------------------------


async def tenants_table(make_branch_key_store: StoreFactory, count: int) -> list[str]:
    """A table of ``count`` branch keys, one per tenant: fetches that share nothing."""
    async with make_branch_key_store() as admin:
        await admin.create_table()
        return [await admin.create_branch_key(f"tenant-{i}") for i in range(count)]


def by_tenant(ctx: Mapping[str, str]) -> str:
    return ctx["tenant"]


async def kms_outage_opens_the_breaker(client: EnvelopeClient, fault_proxy: FaultProxy) -> None:
    fault_proxy.fail_next(THRESHOLD, 500, operation="Decrypt")
    for _ in range(THRESHOLD):
        with pytest.raises(errors.KMSError):
            await client.encrypt(PLAINTEXT, encryption_context={"tenant": "tenant-0"})
    assert client.stats.breaker_states[REGION] == "open"


async def test_a_late_answer_does_not_close_an_open_breaker(
    make_branch_key_store: StoreFactory, fault_proxy: FaultProxy
) -> None:
    """GetItems already in flight when KMS failures open the breaker answer afterwards:
    that says nothing about KMS, and must not close it (their fetches' Decrypts would
    then reach the failing KMS, and each failure reopen it: a flapping breaker)."""
    tenants = await tenants_table(make_branch_key_store, 2 * THRESHOLD)
    store = proxied(make_branch_key_store, fault_proxy, deadline=5.0, max_attempts=1)
    clock = FakeClock()
    keyring = HierarchicalKeyring(store, branch_key_id_supplier=by_tenant)
    async with EnvelopeClient(keyring, clock=clock) as client:
        fault_proxy.fail_next(100, 500, operation="Decrypt")  # KMS is down throughout
        fault_proxy.slow_next(THRESHOLD, 1.0, operation="GetItem")
        late = [
            asyncio.create_task(client.encrypt(PLAINTEXT, encryption_context={"tenant": t}))
            for t in tenants[THRESHOLD:]
        ]
        await wait_for(lambda: fault_proxy.requests().get("GetItem", 0) >= THRESHOLD, "reads")
        for tenant in tenants[:THRESHOLD]:
            with pytest.raises(errors.KMSError):
                await client.encrypt(PLAINTEXT, encryption_context={"tenant": tenant})
        assert client.stats.breaker_states[REGION] == "open"
        decrypts, transitions = fault_proxy.requests()["Decrypt"], client.stats.breaker_transitions
        outcomes = await asyncio.gather(*late, return_exceptions=True)
        assert all(isinstance(o, errors.CircuitOpenError) for o in outcomes), outcomes
        assert fault_proxy.requests()["Decrypt"] == decrypts
        assert client.stats.breaker_transitions == transitions
        assert client.stats.breaker_states[REGION] == "open"


async def test_after_a_kms_outage_only_the_probe_reaches_kms(
    make_branch_key_store: StoreFactory, fault_proxy: FaultProxy
) -> None:
    """After the reset timeout, the probe is a fetch: its GetItem goes through on the
    way, and its KMS Decrypt is the one probe. While that Decrypt is pending (KMS hangs
    now), every other fetch in the region is refused at once: one call reaches the
    failing KMS, not one per waiting tenant."""
    tenants = await tenants_table(make_branch_key_store, 10)
    store = proxied(make_branch_key_store, fault_proxy, deadline=SHORT_DEADLINE, max_attempts=1)
    clock = FakeClock()
    keyring = HierarchicalKeyring(store, branch_key_id_supplier=by_tenant)
    async with EnvelopeClient(keyring, clock=clock) as client:
        await kms_outage_opens_the_breaker(client, fault_proxy)
        fault_proxy.slow_next(100, 3.0, operation="Decrypt")  # KMS hangs now
        clock.advance(RESET_TIMEOUT)
        before = fault_proxy.requests()["Decrypt"]
        probe = asyncio.create_task(
            client.encrypt(PLAINTEXT, encryption_context={"tenant": tenants[0]})
        )
        await wait_for(lambda: fault_proxy.requests()["Decrypt"] > before, "the probe's Decrypt")
        assert client.stats.breaker_states[REGION] == "half_open"
        others = await asyncio.gather(
            *(client.encrypt(PLAINTEXT, encryption_context={"tenant": t}) for t in tenants[1:]),
            return_exceptions=True,
        )
        assert all(isinstance(o, errors.CircuitOpenError) for o in others), others
        with pytest.raises(errors.KMSError):
            await probe
        assert fault_proxy.requests()["Decrypt"] == before + 1
        assert client.stats.breaker_states[REGION] == "open"


async def test_fetches_the_open_breaker_refuses_take_no_rate_limit_token(
    make_branch_key_store: StoreFactory, branch_keys: tuple[str, str], fault_proxy: FaultProxy
) -> None:
    """A fetch refused by the open breaker sends nothing, so it must not spend a token
    of the decrypt rate limit either: otherwise refusals during an outage drain the
    bucket and the probe after it is refused by the rate limit instead of probing."""
    store = proxied(make_branch_key_store, fault_proxy, deadline=5.0, max_attempts=1)
    clock = FakeClock()
    async with EnvelopeClient(
        HierarchicalKeyring(store, branch_key_id=branch_keys[0]),
        clock=clock,
        decrypt_rate_limit=RateLimit(rate=0.001, burst=2 * THRESHOLD),
    ) as client:
        fault_proxy.fail_next(THRESHOLD, 500, operation="Decrypt")
        for _ in range(THRESHOLD):
            with pytest.raises(errors.KMSError):
                await client.encrypt(PLAINTEXT)
        for _ in range(THRESHOLD):
            with pytest.raises(errors.CircuitOpenError):
                await client.encrypt(PLAINTEXT)
        clock.advance(RESET_TIMEOUT)
        message = await client.encrypt(PLAINTEXT)  # the probe, with the last token
        assert await client.decrypt(message) == PLAINTEXT
        assert client.stats.rate_limited == 0


async def test_closing_the_client_under_a_waiting_caller_gives_it_a_library_error(
    make_branch_key_store: StoreFactory, branch_keys: tuple[str, str], fault_proxy: FaultProxy
) -> None:
    """Closing the client cancels the fetch in flight. The caller waiting on it was not
    cancelled itself: a CancelledError would pass for its own cancellation (and vanish
    inside a TaskGroup), so it gets a library error saying what happened."""
    store = proxied(make_branch_key_store, fault_proxy)
    client = EnvelopeClient(HierarchicalKeyring(store, branch_key_id=branch_keys[0]))
    await client.__aenter__()
    fault_proxy.hang(True)
    try:
        waiting = asyncio.create_task(client.encrypt(PLAINTEXT))
        await wait_for(lambda: bool(fault_proxy.requests()), "the fetch's GetItem")
        await client.__aexit__(None, None, None)
    finally:
        fault_proxy.hang(False)
    with pytest.raises(errors.ConfigurationError, match="closed while this call waited"):
        await waiting
    assert not waiting.cancelled()


async def test_a_multikeyring_whose_branch_key_store_is_down_says_try_later_not_wrong_key(
    make_branch_key_store: StoreFactory, branch_keys: tuple[str, str], fault_proxy: FaultProxy
) -> None:
    """A MultiKeyring tries its next child when one fails; when none opens the message
    and a child could not even ask its key service (DynamoDB failing), the answer is that
    transient error (a 503 in the web integrations), not NoUsableKeyError (a 422): the
    unreachable child may well hold the key."""
    (message,) = await messages_under_versions(make_branch_key_store, branch_keys[0], 1)
    store = proxied(make_branch_key_store, fault_proxy, deadline=SHORT_DEADLINE, max_attempts=1)
    reader = MultiKeyring(
        generator=RawAesKeyring("other", "key", bytes(32)),
        children=[HierarchicalKeyring(store, branch_key_id=branch_keys[0])],
    )
    inject(fault_proxy, "dynamodb-500", 100)
    async with EnvelopeClient(reader) as client:
        with pytest.raises(errors.DynamoDBError) as info:
            await client.decrypt(message)
    assert info.value.transient is True
