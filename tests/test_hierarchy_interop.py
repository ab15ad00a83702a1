"""Live message interop between our HierarchicalKeyring and the ESDK 4.x with the MPL's
AwsKmsHierarchicalKeyring and KeyStore, both on the session's moto server (DynamoDB and
KMS), the same table and the same branch keys.

Each side decrypts the other's messages in both committing suites and under every
shape of context; branch keys created and rotated by either side serve both; and every
tampering a hostile store or message can do (a changed context, a swapped EDK, a flipped
bit in each region of the EDK, a branch key item holding another key's ``enc``) is
refused by us with a library error of a known class, and by the MPL too.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, TypeVar

import anyio
import boto3
import pytest
from aws_encryption_sdk.exceptions import AWSEncryptionSDKClientError
from kms_server import KmsKey, MotoKms
from mpl_hierarchy_peer import (
    EDK_REGIONS,
    FRAME_LENGTH,
    MplKeyStoreError,
    MplPeer,
    edk_at,
    edk_region,
)

from aioenvelope import (
    AlgorithmSuite,
    BranchKeyStore,
    EnvelopeClient,
    HierarchicalKeyring,
    MultiKeyring,
    errors,
    inspect,
)

StoreFactory = Callable[..., BranchKeyStore]
T = TypeVar("T")
OursFactory = Callable[[str], EnvelopeClient]
Author = str  # who wrote a message, created or rotated a branch key: one of AUTHORS
AUTHORS = ["ours", "mpl"]

COMMIT = AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY
COMMIT_SIGN = AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384
SUITES = [pytest.param(COMMIT, id="0x0478"), pytest.param(COMMIT_SIGN, id="0x0578")]
PUBLIC_KEY_FIELD = "aws-crypto-public-key"
PLAINTEXT = bytes(range(256)) * 3  # several frames of FRAME_LENGTH and a short final one

CONTEXTS: dict[str, dict[str, str]] = {
    "empty": {},
    "one pair": {"tenant": "tenant-a"},
    "many pairs": {f"field-{i:03}": f"value {i}" for i in range(60)},
    "non-ascii": {"clé": "valeur é", "租户": "数据 🔑", "ключ": "значение", "e\u0301": "NFD"},
    "large values": {"blob": "x" * 20_000, "text": "é" * 8_000, "tiny": ""},
}
RECORD = {"tenant": "shared", "record": "42"}  # the tampering tests' context


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """The MPL (and boto3) are synchronous: run them off the event loop."""
    return await anyio.to_thread.run_sync(fn, *args)


def version_of(message: bytes) -> str:
    """The branch key version the message's (first) EDK names."""
    ciphertext = inspect(message).encrypted_data_keys[0].ciphertext
    start, end = EDK_REGIONS["version"]
    return str(uuid.UUID(bytes=ciphertext[start:end]))


def stored_context(message: bytes) -> dict[str, str]:
    """The context the message's header stores, without the signing key's entry."""
    context = inspect(message).encryption_context
    return {k: v for k, v in context.items() if k != PUBLIC_KEY_FIELD}


@pytest.fixture
def peer(
    moto_kms: MotoKms,
    kms_key: KmsKey,
    make_branch_key_store: StoreFactory,
    branch_keys: tuple[str, str],
) -> MplPeer:
    """The ESDK + MPL on this test's table, where ``tenant-a`` and ``tenant-b`` exist."""
    return MplPeer(moto_kms, kms_key.arn, make_branch_key_store().table_name)


@pytest.fixture
def ours(make_branch_key_store: StoreFactory) -> OursFactory:
    """``ours(branch_key_id)``: a fresh client (fresh store, empty caches) on the table."""

    def make(branch_key_id: str) -> EnvelopeClient:
        keyring = HierarchicalKeyring(make_branch_key_store(), branch_key_id=branch_key_id)
        return EnvelopeClient(keyring, frame_length=FRAME_LENGTH)

    return make


async def write(
    author: Author,
    ours: OursFactory,
    peer: MplPeer,
    branch_key_id: str,
    context: Mapping[str, str] = RECORD,
    suite: AlgorithmSuite = COMMIT,
) -> bytes:
    """One message under ``branch_key_id``, written by ``author``."""
    if author == "mpl":
        return await in_thread(peer.encrypt, branch_key_id, PLAINTEXT, context, suite)
    async with ours(branch_key_id) as client:
        return await client.encrypt(PLAINTEXT, encryption_context=context, algorithm_suite=suite)


async def our_refusal(
    ours: OursFactory, branch_key_id: str, message: bytes, context: Mapping[str, str] | None = None
) -> errors.EnvelopeError:
    """What a fresh client of ours raises decrypting ``message`` (see refusal_by)."""
    async with ours(branch_key_id) as client:
        return await refusal_by(client, message, context)


async def refusal_by(
    client: EnvelopeClient, message: bytes, context: Mapping[str, str] | None = None
) -> errors.EnvelopeError:
    """What ``client`` raises decrypting ``message``: it must raise one of the library's
    errors (plaintext, or an exception of any other kind, fails the test)."""
    with pytest.raises(errors.EnvelopeError) as refused:
        await client.decrypt(message, encryption_context=context)
    return refused.value


async def mpl_refuses(
    peer: MplPeer,
    branch_key_id: str,
    message: bytes,
    context: Mapping[str, str] | None = None,
    keyring: Any = None,
) -> None:
    """The ESDK with an MPL keyring (by default a fresh one) refuses ``message`` too,
    with its own error (never plaintext, never a crash of another kind)."""
    with pytest.raises(AWSEncryptionSDKClientError):
        await in_thread(peer.decrypt, branch_key_id, message, context, keyring)


# -- messages each way ------------------------------------------------------------------


@pytest.mark.parametrize("shape", list(CONTEXTS))
@pytest.mark.parametrize("suite", SUITES)
async def test_the_mpl_and_we_decrypt_each_others_messages(
    peer: MplPeer, ours: OursFactory, suite: AlgorithmSuite, shape: str
) -> None:
    """The interop promise: same suite, same framing, same context, same branch key,
    and each side opens the other's message (the context given back to each side's
    decrypt is checked against the stored one, so both read it the same way)."""
    context = CONTEXTS[shape]
    async with ours("tenant-a") as client:
        mine = await client.encrypt(PLAINTEXT, encryption_context=context, algorithm_suite=suite)
        theirs = await in_thread(peer.encrypt, "tenant-a", PLAINTEXT, context, suite)
        result = await client.decrypt_with_header(theirs, encryption_context=context)
    assert await in_thread(peer.decrypt, "tenant-a", mine, context) == PLAINTEXT
    assert result.plaintext == PLAINTEXT
    for message in (mine, theirs):
        header = inspect(message)
        assert header.algorithm_suite is suite
        assert stored_context(message) == context
        assert (header.frame_length, len(header.encrypted_data_keys)) == (FRAME_LENGTH, 1)
        (edk,) = header.encrypted_data_keys
        assert (edk.provider_id, edk.provider_info, len(edk.ciphertext)) == (
            "aws-kms-hierarchy",
            b"tenant-a",
            92,
        )
    assert version_of(mine) == version_of(theirs)


Written = dict[tuple[Author, str, AlgorithmSuite], bytes]


def rotation_context(phase: str, suite: AlgorithmSuite) -> dict[str, str]:
    return {"phase": phase, "suite": suite.name}


async def write_both(
    written: Written, phase: str, client: EnvelopeClient, peer: MplPeer, branch_key_id: str
) -> None:
    """A message in each suite from ``client`` and from the MPL, into ``written``."""
    for suite in (COMMIT, COMMIT_SIGN):
        context = rotation_context(phase, suite)
        written["ours", phase, suite] = await client.encrypt(
            PLAINTEXT, encryption_context=context, algorithm_suite=suite
        )
        written["mpl", phase, suite] = await in_thread(
            peer.encrypt, branch_key_id, PLAINTEXT, context, suite
        )


@pytest.mark.parametrize("rotator", AUTHORS, ids=["we-rotate", "mpl-rotates"])
@pytest.mark.parametrize("creator", AUTHORS, ids=["we-created", "mpl-created"])
async def test_branch_keys_either_side_created_and_rotated_serve_both(
    peer: MplPeer,
    ours: OursFactory,
    make_branch_key_store: StoreFactory,
    creator: Author,
    rotator: Author,
) -> None:
    """Each library reads the branch keys the other created (the MPL's with a custom
    context, which both rotations carry over) and rotated: messages written before the
    rotation name the old version and still decrypt on both sides; messages written
    after it name the new one. Our rotation goes through the store of the client
    writing, whose next message uses the new version at once; after the MPL's, a fresh
    client (a warm one holds the old active version for its TTL) and the MPL's fresh
    keyrings pick the new version up."""
    branch_key_id, custom = "tenant-a", {}
    if creator == "mpl":
        custom = {"dept": "é-42"}
        branch_key_id = await in_thread(peer.create_key, "mpl-made", custom)
    written: Written = {}
    rotated_to = None  # the version our rotation returns
    store = make_branch_key_store()
    keyring = HierarchicalKeyring(store, branch_key_id=branch_key_id)
    async with EnvelopeClient(keyring, frame_length=FRAME_LENGTH) as client:
        await write_both(written, "before", client, peer, branch_key_id)
        if rotator == "ours":
            rotated_to = await store.rotate_branch_key(branch_key_id)
            await write_both(written, "after", client, peer, branch_key_id)
        else:
            await in_thread(peer.version_key, branch_key_id)
            async with ours(branch_key_id) as fresh:
                await write_both(written, "after", fresh, peer, branch_key_id)
        active = await store.get_active_branch_key(branch_key_id)
    old = version_of(written["ours", "before", COMMIT])
    assert active.version != old
    assert rotated_to in (None, active.version)
    assert dict(active.encryption_context) == custom
    for (author, phase, _), message in written.items():
        assert version_of(message) == (old if phase == "before" else active.version), (
            author,
            phase,
        )
    async with ours(branch_key_id) as reader:
        for (author, phase, suite), message in written.items():
            context = rotation_context(phase, suite)
            assert await reader.decrypt(message, encryption_context=context) == PLAINTEXT
            theirs = await in_thread(peer.decrypt, branch_key_id, message, context)
            assert theirs == PLAINTEXT, (author, phase, suite)


# -- tampering --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "refused_with"),
    [
        ({"record": "43"}, errors.EncryptionContextMismatchError),
        ({"tenant": "shared", "record": "42", "extra": "pair"}, errors.NoUsableKeyError),
    ],
    ids=["changed-value", "extra-pair"],
)
@pytest.mark.parametrize("author", AUTHORS)
async def test_decrypt_with_a_required_context_that_differs_is_refused(
    peer: MplPeer,
    ours: OursFactory,
    author: Author,
    given: dict[str, str],
    refused_with: type[errors.EnvelopeError],
) -> None:
    """A reader that says which context it expects is refused a message under another,
    whoever wrote it. A value the message stores differently is a mismatch, found before
    any key is fetched; a pair the message does not store is taken, as the ESDK does,
    for required context the writer left out of the header, so it joins the context the
    EDK is bound to and no EDK unwraps. The MPL refuses the same message and context."""
    message = await write(author, ours, peer, "tenant-a")
    refusal = await our_refusal(ours, "tenant-a", message, given)
    assert type(refusal) is refused_with
    await mpl_refuses(peer, "tenant-a", message, given)


@pytest.mark.parametrize("author", AUTHORS)
async def test_a_message_whose_stored_context_was_edited_is_refused(
    peer: MplPeer, ours: OursFactory, author: Author
) -> None:
    """The EDK is bound to the whole stored context (its AAD), so a context edited in
    the header (``record`` 42 -> 43, lengths unchanged, so it still parses) leaves the
    keyring no EDK it can unwrap: NoUsableKeyError, whatever is then asked of the
    context; the MPL refuses it too."""
    message = await write(author, ours, peer, "tenant-a")
    pair = b"\x00\x06record\x00\x0242"
    at = message.index(pair) + len(pair) - 1
    edited = message[:at] + b"3" + message[at + 1 :]
    assert stored_context(edited) == {"tenant": "shared", "record": "43"}
    refusal = await our_refusal(ours, "tenant-a", edited)
    assert type(refusal) is errors.NoUsableKeyError
    refusal = await our_refusal(ours, "tenant-a", edited, {"record": "43"})
    assert type(refusal) is errors.NoUsableKeyError
    await mpl_refuses(peer, "tenant-a", edited)


SWAPS = {
    # (what of tenant-a's EDK goes into tenant-b's message, the reader's branch key):
    # the refusal, exactly.
    ("whole EDK", "tenant-a"): errors.AuthenticationError,  # A's data key, B's commitment
    ("whole EDK", "tenant-b"): errors.NoUsableKeyError,  # no EDK names tenant-b any more
    ("ciphertext", "tenant-a"): errors.NoUsableKeyError,  # the EDK still names tenant-b
    ("ciphertext", "tenant-b"): errors.BranchKeyNotFoundError,  # A's version, not B's
}


@pytest.mark.parametrize(("swapped", "reader"), list(SWAPS), ids=lambda v: v.replace(" ", "-"))
@pytest.mark.parametrize("author", AUTHORS)
async def test_an_edk_swapped_between_two_branch_keys_messages_is_refused(
    peer: MplPeer, ours: OursFactory, author: Author, swapped: str, reader: str
) -> None:
    """tenant-a's EDK (whole, or its ciphertext under tenant-b's provider info) put into
    tenant-b's message, same context and suite: it must never decrypt, and the refusal
    is a library error saying what happened. The whole EDK unwraps for tenant-a (it is
    a real EDK of that key and context) to the other message's data key, which the
    key commitment refuses; tenant-a's ciphertext labelled tenant-b names a version
    tenant-b does not have. The MPL refuses every one too."""
    message_a = await write(author, ours, peer, "tenant-a")
    message_b = await write(author, ours, peer, "tenant-b")
    edk_a, edk_b = edk_at(message_a), edk_at(message_b)
    if swapped == "whole EDK":
        piece, start, end = message_a[edk_a.start : edk_a.end], edk_b.start, edk_b.end
    else:
        piece = message_a[edk_a.ciphertext_start : edk_a.end]
        start, end = edk_b.ciphertext_start, edk_b.end
    assert len(piece) == end - start  # same length: the header still parses
    mutant = message_b[:start] + piece + message_b[end:]
    assert inspect(mutant).encrypted_data_keys[0].ciphertext == (
        inspect(message_a).encrypted_data_keys[0].ciphertext
    )
    refusal = await our_refusal(ours, reader, mutant, RECORD)
    assert type(refusal) is SWAPS[swapped, reader]
    await mpl_refuses(peer, reader, mutant, RECORD)


REGION_REFUSALS = {
    "salt": errors.NoUsableKeyError,  # another wrapping key: the tag fails
    "iv": errors.NoUsableKeyError,
    "version": errors.BranchKeyNotFoundError,  # names a version the table does not have
    "wrapped key": errors.NoUsableKeyError,
    "tag": errors.NoUsableKeyError,
}


@pytest.mark.parametrize("region", list(EDK_REGIONS))
@pytest.mark.parametrize("author", AUTHORS)
async def test_a_flipped_bit_in_any_region_of_the_edk_is_refused(
    peer: MplPeer, ours: OursFactory, author: Author, region: str
) -> None:
    """One bit flipped in the EDK's salt, IV, version, wrapped key or tag (first,
    middle and last byte of the region, one mutant each): never plaintext, always the
    region's library error; the MPL refuses them too. The untouched message still
    decrypts after them (no mutant poisoned a cache)."""
    message = await write(author, ours, peer, "tenant-a")
    start, end = edk_region(message, region)
    their_keyring = peer.keyring("tenant-a")
    async with ours("tenant-a") as client:
        for position in sorted({start, (start + end) // 2, end - 1}):
            mutant = bytearray(message)
            mutant[position] ^= 1 << (position % 8)
            refusal = await refusal_by(client, bytes(mutant), RECORD)
            assert type(refusal) is REGION_REFUSALS[region], (position, refusal)
            await mpl_refuses(peer, "tenant-a", bytes(mutant), RECORD, their_keyring)
        assert await client.decrypt(message, encryption_context=RECORD) == PLAINTEXT


@pytest.mark.parametrize("author", AUTHORS)
async def test_a_branch_key_item_holding_another_keys_enc_is_refused(
    peer: MplPeer,
    ours: OursFactory,
    moto_kms: MotoKms,
    make_branch_key_store: StoreFactory,
    author: Author,
) -> None:
    """Someone with write access to the table (not to KMS) copies tenant-b's ``enc``
    into tenant-a's items, hoping tenant-a's messages get wrapped under, or unwrapped
    with, a key they know. KMS refuses the copy (``enc`` is bound to its own item's
    attributes, branch key ID included), so our store says the item cannot be trusted:
    BranchKeyIntegrityError, on decrypt (the version item) and on encrypt (ACTIVE); the
    MPL refuses too."""
    message = await write(author, ours, peer, "tenant-a")
    version = version_of(message)
    table = boto3.client(
        "dynamodb", region_name=moto_kms.region, endpoint_url=moto_kms.endpoint_url
    )
    name = make_branch_key_store().table_name

    def enc(branch_key_id: str, item_type: str) -> Any:
        key = {"branch-key-id": {"S": branch_key_id}, "type": {"S": item_type}}
        return table.get_item(TableName=name, Key=key, ConsistentRead=True)["Item"]["enc"]

    b_active = await in_thread(enc, "tenant-b", "branch:ACTIVE")
    for item_type in (f"branch:version:{version}", "branch:ACTIVE"):
        replace_enc = partial(
            table.update_item,
            TableName=name,
            Key={"branch-key-id": {"S": "tenant-a"}, "type": {"S": item_type}},
            UpdateExpression="SET #e = :e",
            ExpressionAttributeNames={"#e": "enc"},
            ExpressionAttributeValues={":e": b_active},
        )
        await in_thread(replace_enc)
    refusal = await our_refusal(ours, "tenant-a", message, RECORD)
    assert type(refusal) is errors.BranchKeyIntegrityError
    assert f"KMS refused version {version} of branch key 'tenant-a'" in str(refusal)
    async with ours("tenant-a") as client:
        with pytest.raises(errors.BranchKeyIntegrityError) as on_encrypt:
            await client.encrypt(PLAINTEXT, encryption_context=RECORD)
    # The ACTIVE item names the version it copies: the error names that version too.
    assert f"KMS refused version {version} of branch key 'tenant-a'" in str(on_encrypt.value)
    await mpl_refuses(peer, "tenant-a", message, RECORD)
    with pytest.raises(MplKeyStoreError):
        await in_thread(peer.encrypt, "tenant-a", PLAINTEXT, RECORD, COMMIT)


async def test_an_edk_naming_a_version_the_table_lacks_does_not_stop_the_next_edk(
    make_branch_key_store: StoreFactory, branch_keys: tuple[str, str], peer: MplPeer
) -> None:
    """A message with two EDKs for branch key ``tenant-a`` from two key stores (a
    MultiKeyring writing to both): a reader on the second table meets the first EDK,
    whose version its table does not have, then the second, which opens. The MPL tries
    each EDK in turn and decrypts; so must we (we used to stop at the first with
    BranchKeyNotFoundError)."""
    other = make_branch_key_store(table_name=f"hk-other-{uuid.uuid4().hex[:8]}")
    async with other:
        await other.create_table()
        await other.create_branch_key(branch_keys[0])
    writer = MultiKeyring(
        generator=HierarchicalKeyring(other, branch_key_id=branch_keys[0]),
        children=[HierarchicalKeyring(make_branch_key_store(), branch_key_id=branch_keys[0])],
    )
    async with EnvelopeClient(writer) as client:
        message = await client.encrypt(PLAINTEXT, encryption_context=RECORD)
    assert [edk.provider_info for edk in inspect(message).encrypted_data_keys] == [
        branch_keys[0].encode()
    ] * 2
    assert await in_thread(peer.decrypt, branch_keys[0], message, RECORD) == PLAINTEXT
    reader = HierarchicalKeyring(make_branch_key_store(), branch_key_id=branch_keys[0])
    async with EnvelopeClient(reader) as client:
        assert await client.decrypt(message, encryption_context=RECORD) == PLAINTEXT
