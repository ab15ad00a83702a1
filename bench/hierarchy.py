"""1 KiB messages under per-record encryption contexts: the hierarchical keyring against
our raw AES keyring, the KMS keyring and the ESDK + MPL hierarchical keyring.

Every message has its own context (``{"tenant": "bench", "record": "<n>"}``, a new
``n`` each time), as a service binding each record to its row does. All AWS calls go
to one moto server (DynamoDB and KMS) on loopback, in this process:

- ours: ``HierarchicalKeyring`` on a ``BranchKeyStore`` table, branch key cached (the
  warm-up fetched it): per message, a fresh data key wrapped locally (KBKDF + AES-GCM).
- ``RawAesKeyring`` (``cache=None``): a fresh data key wrapped under a key held in
  memory, the floor of any local wrapping. Target: ours >= 0.7x of it.
- ``KmsKeyring`` with the default ``CacheConfig``: each distinct context is a cache
  miss, so every message is a KMS call (GenerateDataKey, Decrypt). Its decrypt client
  keeps one decrypt-cache entry, so cycling through its few pre-encrypted messages
  misses every time, as a stream of distinct records would (the tally shows one KMS
  Decrypt per message). It is ~50x slower: its rounds hold fewer messages.
- the ESDK with the MPL's hierarchical keyring and ``KeyStore`` on the same table and
  branch key (boto3 clients, its default cache, same TTL), for information.

Ours and the ESDK's messages cross-decrypt before timing. The KMS and DynamoDB calls
each subject made while timed are printed per 10,000 messages, and a cold start (a fresh
client encrypting 10,000 messages with 10,000 contexts, another fresh one decrypting
them; 1,000 with ``--quick``) shows the calls a branch key costs: one GetItem and one
KMS Decrypt each way.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import aws_encryption_sdk
import boto3
from aws_encryption_sdk.identifiers import Algorithm, CommitmentPolicy

from aioenvelope import (
    AlgorithmSuite,
    BranchKeyStore,
    CacheConfig,
    EnvelopeClient,
    HierarchicalKeyring,
    KmsKeyring,
    RawAesKeyring,
)
from aioenvelope.errors import ConfigurationError
from aioenvelope.testing import EmbeddedAws, embedded_aws

from .common import KIB, BenchError, Case, Reference, Runner, Settings, Subject, check
from .esdk import ESDK_LABEL

__all__ = ["collect"]

FRAME_LENGTH = 64 * KIB
SUITE = AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY  # the library's default
TABLE = "aioenvelope-bench-branch-keys"
LOGICAL_NAME = "aioenvelope-bench"
BRANCH_KEY_ID = "bench-tenant"
TTL = 3600.0  # longer than any bench run: the timed rounds must never refetch
TARGET = 0.7  # ours / raw AES keyring, the acceptance
POOL = 1000  # distinct pre-encrypted messages cycled through by the local decrypts
KMS_POOL = 50  # the KMS keyring's (each costs a GenerateDataKey to make)
ESDK_POOL = 100
COLD_MESSAGES = 10_000
QUICK_COLD_MESSAGES = 1_000
PER = 10_000  # calls are reported per this many messages

OURS_LABEL = "aioenvelope HierarchicalKeyring"
RAW_LABEL = "aioenvelope RawAesKeyring"
KMS_LABEL = "aioenvelope KmsKeyring"
MPL_LABEL = f"{ESDK_LABEL} + MPL hierarchical"

Calls = Callable[[], tuple[int, int]]
"""(KMS calls, DynamoDB calls) made so far by one subject."""


def _contexts(prefix: str) -> Callable[[], dict[str, str]]:
    """A new record context per call, never the same twice."""
    counter = itertools.count()
    return lambda: {"tenant": "bench", "record": f"{prefix}-{next(counter)}"}


@dataclass
class Tally:
    """AWS calls one subject made while timed (calibration included)."""

    label: str
    op: str
    messages: int = 0
    kms_calls: int = 0
    dynamodb_calls: int = 0

    def line(self) -> str:
        scale = PER / self.messages
        return (
            f"  {self.op} {self.label}: {self.kms_calls * scale:,.1f} KMS and "
            f"{self.dynamodb_calls * scale:,.1f} DynamoDB calls per {PER:,} messages "
            f"({self.kms_calls} and {self.dynamodb_calls} in {self.messages:,})"
        )


def _counted(run: Runner, calls: Calls, tally: Tally) -> Runner:
    async def counted(n: int) -> None:
        kms0, ddb0 = calls()
        await run(n)
        kms1, ddb1 = calls()
        tally.kms_calls += kms1 - kms0
        tally.dynamodb_calls += ddb1 - ddb0
        tally.messages += n

    return counted


def _client_calls(client: EnvelopeClient) -> Calls:
    def calls() -> tuple[int, int]:
        stats = client.stats
        return sum(stats.kms_calls.values()), sum(stats.dynamodb_calls.values())

    return calls


# -- our clients ------------------------------------------------------------------------


@dataclass
class Ours:
    """One of our clients with its per-record contexts and a pool to decrypt."""

    label: str
    client: EnvelopeClient
    data: bytes
    pool: list[tuple[bytes, dict[str, str]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._context = _contexts(self.label)
        self._next = itertools.count()

    async def fill(self, size: int) -> None:
        """Encrypt ``size`` records (each its own context), checked to decrypt."""
        for _ in range(size):
            context = self._context()
            blob = await self.client.encrypt(self.data, encryption_context=context)
            self.pool.append((blob, context))
        blob, context = self.pool[0]
        check(
            await self.client.decrypt(blob, encryption_context=context) == self.data,
            f"{self.label} round trip lost data",
        )

    async def encrypt(self, n: int) -> None:
        for _ in range(n):
            await self.client.encrypt(self.data, encryption_context=self._context())

    async def decrypt(self, n: int) -> None:
        pool, size = self.pool, len(self.pool)
        for _ in range(n):
            blob, context = pool[next(self._next) % size]
            await self.client.decrypt(blob, encryption_context=context)


# -- the ESDK with the MPL's hierarchical keyring ---------------------------------------


class EsdkHierarchy:
    """``EncryptionSDKClient`` with the MPL's ``AwsKmsHierarchicalKeyring`` over its own
    ``KeyStore`` on our table (boto3 clients pointed at the moto server, throwaway
    credentials, an event hook counting their calls)."""

    def __init__(self, kms: EmbeddedAws, key_arn: str, data: bytes) -> None:
        from aws_cryptographic_material_providers.keystore import KeyStore
        from aws_cryptographic_material_providers.keystore.config import KeyStoreConfig
        from aws_cryptographic_material_providers.keystore.models import (
            KMSConfigurationKmsKeyArn,
        )
        from aws_cryptographic_material_providers.mpl import AwsCryptographicMaterialProviders
        from aws_cryptographic_material_providers.mpl.config import MaterialProvidersConfig
        from aws_cryptographic_material_providers.mpl.models import (
            CacheTypeDefault,
            CreateAwsKmsHierarchicalKeyringInput,
            DefaultCache,
        )

        self.kms_calls = 0
        self.dynamodb_calls = 0
        self.data = data
        self.pool: list[tuple[bytes, dict[str, str]]] = []
        self._context = _contexts("esdk")
        self._next = itertools.count()
        clients = {
            service: boto3.client(
                service,
                region_name=kms.region,
                endpoint_url=kms.endpoint_url,
                aws_access_key_id="embedded-kms",
                aws_secret_access_key="embedded-kms",  # not a secret: moto accepts any
            )
            for service in ("kms", "dynamodb")
        }
        clients["kms"].meta.events.register("before-call.kms", self._count_kms)
        clients["dynamodb"].meta.events.register("before-call.dynamodb", self._count_ddb)
        key_store = KeyStore(
            KeyStoreConfig(
                ddb_table_name=TABLE,
                logical_key_store_name=LOGICAL_NAME,
                kms_configuration=KMSConfigurationKmsKeyArn(key_arn),
                ddb_client=clients["dynamodb"],
                kms_client=clients["kms"],
            )
        )
        mpl = AwsCryptographicMaterialProviders(config=MaterialProvidersConfig())
        self._keyring = mpl.create_aws_kms_hierarchical_keyring(
            CreateAwsKmsHierarchicalKeyringInput(
                key_store=key_store,
                branch_key_id=BRANCH_KEY_ID,
                ttl_seconds=int(TTL),
                cache=CacheTypeDefault(DefaultCache(entry_capacity=100)),
            )
        )
        self._client = aws_encryption_sdk.EncryptionSDKClient(
            commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
        )

    def _count_kms(self, **_: Any) -> None:
        self.kms_calls += 1

    def _count_ddb(self, **_: Any) -> None:
        self.dynamodb_calls += 1

    def calls(self) -> tuple[int, int]:
        return self.kms_calls, self.dynamodb_calls

    def encrypt_one(self, context: Mapping[str, str]) -> bytes:
        ciphertext, _header = self._client.encrypt(
            source=self.data,
            keyring=self._keyring,
            encryption_context=dict(context),
            algorithm=Algorithm.get_by_id(SUITE.suite_id),
            frame_length=FRAME_LENGTH,
        )
        return bytes(ciphertext)

    def decrypt_one(self, blob: bytes, context: Mapping[str, str]) -> bytes:
        """The MPL checks the given context against the message's (reproduced context)."""
        plaintext, _header = self._client.decrypt(
            source=blob, keyring=self._keyring, encryption_context=dict(context)
        )
        return bytes(plaintext)

    def fill(self, size: int) -> None:
        for _ in range(size):
            context = self._context()
            self.pool.append((self.encrypt_one(context), context))

    async def encrypt(self, n: int) -> None:
        for _ in range(n):
            self.encrypt_one(self._context())

    async def decrypt(self, n: int) -> None:
        pool, size = self.pool, len(self.pool)
        for _ in range(n):
            blob, context = pool[next(self._next) % size]
            self.decrypt_one(blob, context)


async def _cross_check(ours: Ours, esdk: EsdkHierarchy) -> None:
    """Each side decrypts the other's message: same table, branch key, suite and frame
    length, so the comparison is like for like."""
    blob, context = ours.pool[0]
    check(esdk.decrypt_one(blob, context) == ours.data, "the MPL did not read our message")
    theirs, their_context = esdk.pool[0]
    result = await ours.client.decrypt_with_header(theirs, encryption_context=their_context)
    check(result.plaintext == ours.data, "aioenvelope did not read the MPL's message back")
    check(
        result.header.algorithm_suite is SUITE and result.header.frame_length == FRAME_LENGTH,
        f"the ESDK wrote {result.header.algorithm_suite.name} with frame length "
        f"{result.header.frame_length}; the bench asked for {SUITE.name} and {FRAME_LENGTH}",
    )


# -- cold start ---------------------------------------------------------------------------


async def _cold_start(store: Callable[[], BranchKeyStore], messages: int, data: bytes) -> str:
    """A fresh client encrypts ``messages`` records, another fresh one decrypts them:
    the calls each made, start-up included."""
    context = _contexts("cold")
    sealed: list[tuple[bytes, dict[str, str]]] = []
    async with EnvelopeClient(HierarchicalKeyring(store(), branch_key_id=BRANCH_KEY_ID)) as c:
        for _ in range(messages):
            record = context()
            sealed.append((await c.encrypt(data, encryption_context=record), record))
        encrypt_stats = c.stats
    async with EnvelopeClient(HierarchicalKeyring(store(), branch_key_id=BRANCH_KEY_ID)) as c:
        for blob, record in sealed:
            check(
                await c.decrypt(blob, encryption_context=record) == data,
                "hierarchical round trip lost data",
            )
        decrypt_stats = c.stats

    def calls(stats: Any) -> str:
        both = {**stats.kms_calls, **stats.dynamodb_calls}
        return ", ".join(f"{n} {op}" for op, n in sorted(both.items())) or "no calls"

    return (
        f"  cold start, {messages:,} records with {messages:,} contexts: a fresh client "
        f"encrypting them made {calls(encrypt_stats)}; another decrypting them made "
        f"{calls(decrypt_stats)}"
    )


def _report(lines: list[str], tallies: list[Tally]) -> None:
    print("Hierarchical keyring, per-record contexts: AWS calls while timed")
    print("\n".join([*lines, *(t.line() for t in tallies if t.messages)]), flush=True)


async def collect(settings: Settings, stack: AsyncExitStack) -> list[Case]:
    """Start moto, create the table and branch key, build and cross-check every side,
    run the cold start; cases to time."""
    try:
        kms = stack.enter_context(embedded_aws())
    except ConfigurationError as exc:
        raise BenchError(f"{exc} (the hierarchy benchmark needs moto[server])") from exc
    key_arn = await kms.create_kms_key("bench-hierarchy")
    session = kms.session()  # one session: each new one reloads botocore's models

    def store() -> BranchKeyStore:
        return BranchKeyStore(
            TABLE,
            logical_key_store_name=LOGICAL_NAME,
            kms_key_id=key_arn,
            session=session,
            region_name=kms.region,
            endpoint_url=kms.endpoint_url,
        )

    async with store() as admin:
        await admin.create_table()
        await admin.create_branch_key(BRANCH_KEY_ID)

    data = os.urandom(KIB)
    cold = await _cold_start(store, QUICK_COLD_MESSAGES if settings.quick else COLD_MESSAGES, data)

    async def client(keyring: Any, **kwargs: Any) -> EnvelopeClient:
        made = await stack.enter_async_context(
            EnvelopeClient(keyring, frame_length=FRAME_LENGTH, **kwargs)
        )
        check(made.algorithm_suite is SUITE, f"the default suite is {made.algorithm_suite}")
        return made

    hierarchy = Ours(
        OURS_LABEL,
        await client(HierarchicalKeyring(store(), branch_key_id=BRANCH_KEY_ID, ttl=TTL)),
        data,
    )
    raw = Ours(
        RAW_LABEL,
        await client(RawAesKeyring("bench", "aes-256", os.urandom(32)), cache=None),
        data,
    )
    kms_keyring = KmsKeyring(
        key_arn, session=session, region_name=kms.region, endpoint_url=kms.endpoint_url
    )
    kms_ours = Ours(
        KMS_LABEL, await client(kms_keyring, cache=CacheConfig(decrypt_entries=1)), data
    )
    esdk = EsdkHierarchy(kms, key_arn, data)
    for side, size in ((hierarchy, POOL), (raw, POOL), (kms_ours, KMS_POOL)):
        await side.fill(size)
    esdk.fill(ESDK_POOL)
    await _cross_check(hierarchy, esdk)

    group = f"1 KiB 0x{SUITE.suite_id:04X} per-record contexts"
    counted = {
        OURS_LABEL: _client_calls(hierarchy.client),
        KMS_LABEL: _client_calls(kms_ours.client),
        MPL_LABEL: esdk.calls,
    }
    tallies: list[Tally] = []

    def subject(label: str, op: str, run: Runner) -> tuple[str, Runner]:
        """``run``, its AWS calls tallied if the subject makes any."""
        if label not in counted:
            return label, run
        tally = Tally(label, op)
        tallies.append(tally)
        return label, _counted(run, counted[label], tally)

    cases: list[Case] = []
    for op in ("encrypt", "decrypt"):
        ours = Subject(*subject(OURS_LABEL, op, getattr(hierarchy, op)))
        references = (
            Reference(*subject(RAW_LABEL, op, getattr(raw, op)), target=TARGET),
            Reference(*subject(KMS_LABEL, op, getattr(kms_ours, op))),
            Reference(*subject(MPL_LABEL, op, getattr(esdk, op))),
        )
        cases.append(Case(group, op, "msg/s", 1, ours, references))
    stack.callback(_report, [cold], tallies)
    return cases
