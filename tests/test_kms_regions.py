"""Which KMS regions a keyring may call, and how many clients and breakers that costs.

The region of a discovery EDK is part of the message, chosen by whoever wrote it. A
discovery keyring calls KMS only in the regions it is allowed (``regions=``, default its
home region); an EDK naming another region is skipped like an EDK of an unknown key, and
never opens a client or a breaker. Clients per keyring and breakers per client are
bounded, evicted ones closed; opening a client that botocore refuses is a ``KMSError``.
All against a real moto KMS (behind the fault proxy where a call must be held).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Sequence
from typing import Any

import pytest
from fault_proxy import FaultProxy, wait_for
from kms_server import REGION, KmsKey, MotoKms
from moto_keyrings import moto_kms_discovery_keyring, moto_kms_keyring
from tracking_session import TrackingSession

from aioenvelope import (
    CircuitBreakerConfig,
    EncryptedDataKey,
    EncryptionMaterials,
    EnvelopeClient,
    Keyring,
    KmsDiscoveryKeyring,
    MultiKeyring,
    RawAesKeyring,
    errors,
)
from aioenvelope.runtime import Runtime
from aioenvelope.stats import StatsRecorder

CONTEXT = {"tenant": "t1", "purpose": "kms-region-tests"}
PLAINTEXT = b"attack at dawn " * 7
OTHER_REGION = "eu-west-1"
ACCOUNT = "111122223333"
# Seventeen real region names (moto serves each): one more than a keyring's client cap.
REAL_REGIONS = [
    "us-west-2",
    "us-east-1",
    "us-east-2",
    "us-west-1",
    "eu-west-1",
    "eu-west-2",
    "eu-west-3",
    "eu-central-1",
    "eu-north-1",
    "ap-south-1",
    "ap-northeast-1",
    "ap-northeast-2",
    "ap-southeast-1",
    "ap-southeast-2",
    "ca-central-1",
    "sa-east-1",
    "eu-south-1",
]
MAX_CLIENTS = 16


# -- helpers -----------------------------------------------------------------------------


def forged_arn(region: str) -> str:
    return f"arn:aws:kms:{region}:{ACCOUNT}:key/{uuid.uuid4()}"


class ForgedKmsEdks(Keyring):
    """What an attacker's writer does: add ``aws-kms`` EDKs naming keys (in regions) of
    its choosing, with ciphertext no KMS will accept."""

    def __init__(self, arns: Sequence[str]) -> None:
        self.arns = list(arns)

    async def on_encrypt(self, materials: EncryptionMaterials) -> EncryptionMaterials:
        for arn in self.arns:
            edk = EncryptedDataKey("aws-kms", arn.encode("utf-8"), os.urandom(184))
            materials = materials.with_encrypted_data_key(edk)
        return materials


async def forged_message(raw: RawAesKeyring, arns: Sequence[str]) -> bytes:
    """A message whose data key the raw key wraps, plus forged KMS EDKs for ``arns``."""
    writer = MultiKeyring(generator=raw, children=[ForgedKmsEdks(arns)])
    async with EnvelopeClient(writer, max_encrypted_data_keys=len(arns) + 1) as client:
        return await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)


@pytest.fixture
def raw() -> RawAesKeyring:
    return RawAesKeyring("test", "break-glass", os.urandom(32))


@pytest.fixture(scope="module")
def other_region_key(moto_kms: MotoKms) -> KmsKey:
    return moto_kms.create_key(region=OTHER_REGION)


# -- the allow-list ----------------------------------------------------------------------


async def test_forged_edk_regions_open_no_client_no_breaker_and_make_no_call(
    moto_kms: MotoKms, raw: RawAesKeyring
) -> None:
    """Ten messages, each with ten EDKs naming a new region: the old keyring opened 100
    KMS clients (about 115 MiB) and 100 breakers and kept them. Now none is opened,
    nothing is called, and each decryption fails with a NoUsableKeyError."""
    messages = [
        await forged_message(raw, [forged_arn(f"zz-forged-{m * 10 + i}") for i in range(10)])
        for m in range(10)
    ]
    tracking = TrackingSession()
    keyring = moto_kms_discovery_keyring(moto_kms, session=tracking.session)
    async with EnvelopeClient(keyring, cache=None, max_encrypted_data_keys=11) as client:
        for blob in messages:
            with pytest.raises(errors.NoUsableKeyError):
                await client.decrypt(blob, encryption_context=CONTEXT)
        stats = client.stats
    assert tracking.opened == []
    assert keyring.kms_calls == {}
    assert dict(stats.breaker_states) == {}


@pytest.mark.parametrize(
    "region",
    ["not a region!", "us-west-2\n", "x" * 5000, "us-west-2.evil.example"],
    ids=["spaces", "newline", "long", "dotted"],
)
async def test_malformed_edk_region_is_skipped_so_a_multikeyring_falls_back(
    moto_kms: MotoKms, raw: RawAesKeyring, region: str
) -> None:
    """A region botocore would refuse (it raised InvalidRegionError, not an
    EnvelopeError, and the MultiKeyring never got to its raw key) is skipped: the raw
    child decrypts, and the discovery keyring alone says what it skipped, quoted and cut
    short."""
    blob = await forged_message(raw, [forged_arn(region)])
    tracking = TrackingSession()
    reader = MultiKeyring(
        generator=moto_kms_discovery_keyring(moto_kms, session=tracking.session), children=[raw]
    )
    async with EnvelopeClient(reader) as client:
        assert await client.decrypt(blob, encryption_context=CONTEXT) == PLAINTEXT
    assert tracking.opened == []

    alone = moto_kms_discovery_keyring(moto_kms, session=tracking.session)
    with pytest.raises(errors.NoUsableKeyError) as info:
        async with EnvelopeClient(alone) as client:
            await client.decrypt(blob, encryption_context=CONTEXT)
    message = str(info.value)
    assert repr(region[:64]) in message
    if len(region) > 64:
        assert region[:65] not in message  # cut short
    assert "\n" not in message
    assert tracking.opened == []


async def test_edk_of_a_region_not_allowed_is_named_with_how_to_allow_it(
    moto_kms: MotoKms, other_region_key: KmsKey
) -> None:
    """A genuine message under a key in eu-west-1 is refused by a us-west-2 discovery
    keyring without a call; the error names the region and ``regions=``; listing both
    regions decrypts it."""
    writer = moto_kms_keyring(moto_kms, other_region_key.arn)
    async with EnvelopeClient(writer) as client:
        blob = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)

    home_only = moto_kms_discovery_keyring(moto_kms)
    with pytest.raises(errors.NoUsableKeyError) as info:
        async with EnvelopeClient(home_only) as client:
            await client.decrypt(blob, encryption_context=CONTEXT)
    assert f"'{OTHER_REGION}'" in str(info.value)
    assert f"'{REGION}'" in str(info.value)
    assert "regions=" in str(info.value)
    assert home_only.kms_calls == {}

    both = moto_kms_discovery_keyring(moto_kms, regions=[REGION, OTHER_REGION])
    async with EnvelopeClient(both) as client:
        assert await client.decrypt(blob, encryption_context=CONTEXT) == PLAINTEXT
    assert both.kms_calls == {"Decrypt": 1}


def test_a_discovery_keyring_needs_a_home_region_or_regions(
    moto_kms: MotoKms, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no region at all there is nothing to allow: refused at construction, saying
    what to pass, rather than trusting every EDK's region."""
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    with pytest.raises(errors.ConfigurationError, match="regions="):
        KmsDiscoveryKeyring(endpoint_url=moto_kms.endpoint_url)
    keyring = KmsDiscoveryKeyring(endpoint_url=moto_kms.endpoint_url, regions=[OTHER_REGION])
    assert keyring.regions == {OTHER_REGION}


@pytest.mark.parametrize(
    "options",
    [
        {"regions": "us-west-2"},
        {"regions": []},
        {"regions": ["us-west-2", "not a region"]},
        {"regions": ["us-west-2\n"]},
        {"regions": [""]},
        {"regions": [REGION, OTHER_REGION], "mrk_aware": True},
    ],
    ids=["string", "empty", "spaces", "newline", "blank", "mrk-aware-elsewhere"],
)
def test_regions_must_be_region_names(moto_kms: MotoKms, options: dict[str, Any]) -> None:
    with pytest.raises(errors.ConfigurationError):
        moto_kms_discovery_keyring(moto_kms, **options)


# -- client creation inside the error mapping --------------------------------------------


async def test_a_key_in_a_region_botocore_refuses_is_a_kms_error_and_multikeyring_falls_back(
    moto_kms: MotoKms, raw: RawAesKeyring
) -> None:
    """Opening the client is part of the call: a configured key ARN whose region botocore
    refuses gives a KMSError naming it (not botocore's InvalidRegionError), on encrypt and
    on decrypt, and a MultiKeyring goes on to its next child."""
    bad = forged_arn("bad_region")
    with pytest.raises(errors.KMSError) as info:
        async with EnvelopeClient(moto_kms_keyring(moto_kms, bad, check_keys=False)) as client:
            await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
    assert info.value.error_code == "InvalidRegionError"
    assert info.value.transient is False
    assert "'bad_region'" in str(info.value)

    blob = await forged_message(raw, [bad])
    strict = moto_kms_keyring(moto_kms, bad, check_keys=False)
    async with EnvelopeClient(MultiKeyring(generator=strict, children=[raw])) as client:
        assert await client.decrypt(blob, encryption_context=CONTEXT) == PLAINTEXT


# -- bounds ------------------------------------------------------------------------------


async def test_a_keyring_keeps_at_most_sixteen_clients_and_closes_the_evicted(
    moto_kms: MotoKms, raw: RawAesKeyring
) -> None:
    """Seventeen allowed regions, one message naming a key in each: every region gets a
    client in turn, never more than sixteen open at once, the least recently used one
    closed to make room, all closed on exit."""
    blob = await forged_message(raw, [forged_arn(region) for region in REAL_REGIONS])
    tracking = TrackingSession()
    keyring = moto_kms_discovery_keyring(moto_kms, session=tracking.session, regions=REAL_REGIONS)
    async with EnvelopeClient(keyring, cache=None, max_encrypted_data_keys=18) as client:
        with pytest.raises(errors.NoUsableKeyError):
            await client.decrypt(blob, encryption_context=CONTEXT)
        assert tracking.open_clients == MAX_CLIENTS
    assert tracking.opened == REAL_REGIONS
    assert tracking.most_open_at_once() == MAX_CLIENTS
    assert tracking.events[MAX_CLIENTS] == ("close", REAL_REGIONS[0])
    assert tracking.open_clients == 0
    assert keyring.kms_calls == {"Decrypt": len(REAL_REGIONS)}


async def test_an_evicted_client_finishes_its_call_before_it_is_closed(
    moto_kms: MotoKms, kms_key: KmsKey, raw: RawAesKeyring, fault_proxy: FaultProxy
) -> None:
    """A client evicted while a call is in flight on it is closed when that call ends,
    not under it: the held us-west-2 Decrypt still succeeds after sixteen other regions
    pushed its client out."""
    writer = moto_kms_keyring(moto_kms, kms_key.arn)
    async with EnvelopeClient(writer) as client:
        genuine = await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
    others = [await forged_message(raw, [forged_arn(region)]) for region in REAL_REGIONS[1:]]
    tracking = TrackingSession()
    keyring = moto_kms_discovery_keyring(
        moto_kms,
        endpoint_url=fault_proxy.url,
        session=tracking.session,
        regions=REAL_REGIONS,
        deadline=30.0,
    )
    async with EnvelopeClient(keyring, cache=None) as client:
        fault_proxy.hang(True)
        held = asyncio.create_task(client.decrypt(genuine, encryption_context=CONTEXT))
        await wait_for(lambda: fault_proxy.requests().get("Decrypt") == 1, "the held Decrypt")
        rest = [
            asyncio.create_task(client.decrypt(blob, encryption_context=CONTEXT)) for blob in others
        ]
        await wait_for(lambda: fault_proxy.requests().get("Decrypt") == 17, "all 17 Decrypts")
        assert ("close", REGION) not in tracking.events  # evicted, but in use
        assert tracking.open_clients == MAX_CLIENTS + 1
        fault_proxy.hang(False)
        assert await asyncio.wait_for(held, 10) == PLAINTEXT
        outcomes = await asyncio.wait_for(asyncio.gather(*rest, return_exceptions=True), 10)
        assert all(isinstance(o, errors.NoUsableKeyError) for o in outcomes)
        assert ("close", REGION) in tracking.events  # closed by its last call
        assert tracking.open_clients == MAX_CLIENTS
    assert tracking.open_clients == 0


def test_runtime_keeps_at_most_max_breakers_evicting_closed_ones_first() -> None:
    """Breakers are bounded too; an open breaker (state worth keeping) outlives closed
    ones, and an evicted region leaves the stats."""
    stats = StatsRecorder()
    runtime = Runtime(
        clock=lambda: 0.0,
        stats=stats,
        breaker_config=CircuitBreakerConfig(failure_threshold=1),
        max_breakers=4,
    )
    first = runtime.breaker("r-0")
    assert first is not None
    first.record_failure()
    for i in range(1, 50):
        assert runtime.breaker(f"r-{i}") is not None
    assert len(stats.breaker_states) == 4
    assert stats.breaker_states["r-0"] == "open"
    assert runtime.breaker("r-0") is first
