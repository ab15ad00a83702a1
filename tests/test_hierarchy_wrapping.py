"""The hierarchical keyring's wrapping of data keys under branch keys, with no server.

Byte compatibility with the MPL is proved on the messages it wrote
(``../shared/hierarchy-vectors``): their EDKs unwrap to the data keys it used, and the
whole messages decrypt through ``EnvelopeClient`` with a test keyring handed the branch
keys. The rest pins our own wrap: round trips, the EDK layout, one library error per
tampering, random bytes, and the (key, IV) seam.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import os
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hierarchy_vectors import (
    ENV_VAR,
    REQUIRE_VAR,
    HierarchyVector,
    load_vectors,
    missing_vectors_message,
    vectors_dir,
    vectors_required,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from static_branch_keyring import StaticBranchKeyring
from suites import COMMIT, COMMIT_SIGN, COMMITTING_SUITES

from aioenvelope import AlgorithmSuite, EnvelopeClient, inspect
from aioenvelope.errors import ConfigurationError, NoUsableKeyError
from aioenvelope.format import nonce_log
from aioenvelope.keyrings.hierarchy.wrapping import (
    PROVIDER_ID,
    branch_key_version_of,
    edk_length,
    unwrap_data_key,
    wrap_data_key,
)

PUBLIC_KEY_FIELD = "aws-crypto-public-key"

# -- the MPL's vectors ---------------------------------------------------------------------

VECTORS_DIR = vectors_dir()
VECTOR_FILE = load_vectors(VECTORS_DIR) if (VECTORS_DIR / "vectors.json").is_file() else None


def vectors_missing() -> None:
    """Skip when the vectors are absent, unless CI (or an explicit path) asked for them."""
    if os.environ.get(ENV_VAR) or vectors_required():
        pytest.fail(
            f"{REQUIRE_VAR if vectors_required() else ENV_VAR} is set, but "
            + missing_vectors_message(VECTORS_DIR),
            pytrace=False,
        )
    pytest.skip(missing_vectors_message(VECTORS_DIR))


def vector_params() -> list[object]:
    if VECTOR_FILE is None:
        return [pytest.param(None, id="vectors-missing")]
    return [
        pytest.param(v, id=f"{AlgorithmSuite[v.algorithm].suite_id:04x}-{v.branch_key_version[:8]}")
        for v in VECTOR_FILE.vectors
    ]


def branch_key_id() -> str:
    if VECTOR_FILE is None:
        vectors_missing()
    assert VECTOR_FILE is not None
    return VECTOR_FILE.branch_key_id


def need(vector: HierarchyVector | None) -> HierarchyVector:
    if vector is None:
        vectors_missing()
    assert vector is not None
    return vector


def all_versions_keyring() -> StaticBranchKeyring:
    assert VECTOR_FILE is not None
    keys = {v.branch_key_version: v.branch_key for v in VECTOR_FILE.vectors}
    return StaticBranchKeyring(
        VECTOR_FILE.branch_key_id, keys, VECTOR_FILE.vectors[-1].branch_key_version
    )


def test_vector_file_holds_both_suites_under_two_versions() -> None:
    """Pins the loader: three messages, 0x0478 and 0x0578, two versions of one branch key
    (before and after a rotation), and the data key of two of them."""
    branch_key_id()
    assert VECTOR_FILE is not None
    vectors = VECTOR_FILE.vectors
    assert len(vectors) == 3
    assert {v.algorithm for v in vectors} == {COMMIT.name, COMMIT_SIGN.name}
    assert len({v.branch_key_version for v in vectors}) == 2
    assert sum(v.data_key is not None for v in vectors) == 2


@pytest.mark.parametrize("vector", vector_params())
def test_mpl_edk_unwraps_to_the_data_key_the_mpl_used(vector: HierarchyVector | None) -> None:
    """The EDK from the parsed header, unwrapped under the header's full context (with
    ``aws-crypto-public-key`` for 0x0578), is the MPL's plaintext data key."""
    vector = need(vector)
    header = inspect(vector.message)
    assert header.algorithm_suite is AlgorithmSuite[vector.algorithm]
    [edk] = header.encrypted_data_keys
    assert edk.provider_id == PROVIDER_ID
    assert edk.provider_info == branch_key_id().encode("utf-8")
    assert len(edk.ciphertext) == edk_length(header.algorithm_suite.key_length) == 92
    assert branch_key_version_of(edk.ciphertext) == vector.branch_key_version
    assert (PUBLIC_KEY_FIELD in header.encryption_context) == header.algorithm_suite.signing
    data_key = unwrap_data_key(
        vector.branch_key,
        branch_key_id(),
        vector.branch_key_version,
        edk.ciphertext,
        header.encryption_context,
        key_length=header.algorithm_suite.key_length,
    )
    assert len(data_key) == 32
    if vector.data_key is not None:
        assert data_key == vector.data_key


@pytest.mark.parametrize("vector", vector_params())
async def test_mpl_message_decrypts_to_its_plaintext_through_envelope_client(
    vector: HierarchyVector | None,
) -> None:
    vector = need(vector)
    async with EnvelopeClient(all_versions_keyring()) as client:
        assert await client.decrypt(vector.message) == vector.plaintext


@pytest.mark.parametrize("vector", vector_params())
def test_mpl_edk_is_bound_to_the_whole_context(vector: HierarchyVector | None) -> None:
    """Without the public key (signing suites) or with a pair dropped, the tag fails:
    the MPL's AAD is the materials' full context."""
    vector = need(vector)
    header = inspect(vector.message)
    [edk] = header.encrypted_data_keys
    first = sorted(header.encryption_context)[0]
    partial = {k: v for k, v in header.encryption_context.items() if k != first}
    with pytest.raises(NoUsableKeyError, match="does not authenticate"):
        unwrap_data_key(
            vector.branch_key,
            branch_key_id(),
            vector.branch_key_version,
            edk.ciphertext,
            partial,
            key_length=32,
        )


def test_missing_vectors_skip_unless_required(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A fresh clone without the folder skips, saying where to get it; CI's variable
    (or an explicit path) turns the same absence into a failure."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.delenv(REQUIRE_VAR, raising=False)
    with pytest.raises(pytest.skip.Exception, match="hierarchy-vectors"):
        vectors_missing()
    monkeypatch.setenv(REQUIRE_VAR, "1")
    with pytest.raises(pytest.fail.Exception, match=f"{REQUIRE_VAR} is set"):
        vectors_missing()
    monkeypatch.delenv(REQUIRE_VAR)
    monkeypatch.setenv(ENV_VAR, os.fspath(tmp_path))
    assert vectors_dir() == tmp_path
    with pytest.raises(pytest.fail.Exception, match=f"{ENV_VAR} is set"):
        vectors_missing()


# -- our wrap ------------------------------------------------------------------------------

BRANCH_KEY_ID = "tenant-42 branch key"
VERSION = "8090d5cd-ee0c-4973-ad79-dfd08644a128"
OTHER_VERSION = "f48fdc7d-1dbf-436f-b4d1-f64b4c90d126"
BRANCH_KEY = bytes(range(32))
OTHER_BRANCH_KEY = bytes(range(32, 64))
DATA_KEY = bytes(range(100, 132))
SIGN_CONTEXT_VALUE = "A" + "x" * 63 + "="  # shape of a base64 compressed P-384 point

CONTEXTS: Mapping[str, Mapping[str, str]] = {
    "empty": {},
    "ascii": {"tenant": "t-1", "row": "1234"},
    # UTF-8 byte order differs from UTF-16 code-unit order for these two keys.
    "unicode": {"\uffff": "bmp", "\U0001f600": "astral", "clé": "värde ✓"},
}


def suite_context(suite: AlgorithmSuite, context: Mapping[str, str]) -> dict[str, str]:
    """The materials' context for ``suite``: signing suites add the public key."""
    full = dict(context)
    if suite.signing:
        full[PUBLIC_KEY_FIELD] = SIGN_CONTEXT_VALUE
    return full


def wrapped(context: Mapping[str, str] = CONTEXTS["ascii"]) -> bytes:
    return wrap_data_key(BRANCH_KEY, BRANCH_KEY_ID, VERSION, DATA_KEY, context)


def unwrap(
    edk: bytes,
    context: Mapping[str, str] = CONTEXTS["ascii"],
    *,
    branch_key: bytes = BRANCH_KEY,
    branch_key_id: str = BRANCH_KEY_ID,
    version: str = VERSION,
    key_length: int = 32,
) -> bytes:
    return unwrap_data_key(branch_key, branch_key_id, version, edk, context, key_length=key_length)


@pytest.mark.parametrize("context", list(CONTEXTS.values()), ids=list(CONTEXTS))
@pytest.mark.parametrize("suite", COMMITTING_SUITES)
def test_wrap_then_unwrap_returns_the_data_key(
    suite: AlgorithmSuite, context: Mapping[str, str]
) -> None:
    full = suite_context(suite, context)
    data_key = bytearray(os.urandom(suite.key_length))  # as a keyring holding keys has them
    edk = wrap_data_key(bytearray(BRANCH_KEY), BRANCH_KEY_ID, VERSION, data_key, full)
    assert unwrap(edk, full, key_length=suite.key_length) == data_key


def test_edk_is_salt_iv_version_ciphertext_tag_under_the_reference_kdf() -> None:
    """Recomputed from the reference's formula with the standard library's HMAC (an
    independent check of the KBKDF parameters): K = HMAC-SHA256(branch key,
    00000001 | label | 00 | salt | 00000100), AAD = label | ID | version | context."""
    context = CONTEXTS["unicode"]
    edk = wrapped(context)
    assert len(edk) == 92
    salt, iv, version, sealed = edk[:16], edk[16:28], edk[28:44], edk[44:]
    assert version == uuid.UUID(VERSION).bytes
    assert branch_key_version_of(edk) == VERSION
    label = PROVIDER_ID.encode()
    key = hmac.new(
        BRANCH_KEY, b"\x00\x00\x00\x01" + label + b"\x00" + salt + b"\x00\x00\x01\x00", "sha256"
    ).digest()
    pairs = sorted((k.encode(), v.encode()) for k, v in context.items())
    canonical = len(pairs).to_bytes(2, "big") + b"".join(
        len(k).to_bytes(2, "big") + k + len(v).to_bytes(2, "big") + v for k, v in pairs
    )
    aad = label + BRANCH_KEY_ID.encode() + version + canonical
    assert AESGCM(key).decrypt(iv, sealed, aad) == DATA_KEY


def test_each_wrap_draws_a_fresh_salt_and_iv() -> None:
    edks = [wrapped() for _ in range(50)]
    assert len({edk[:16] for edk in edks}) == 50
    assert len({edk[16:28] for edk in edks}) == 50


@pytest.mark.parametrize("context", list(CONTEXTS.values()), ids=list(CONTEXTS))
@pytest.mark.parametrize("suite", COMMITTING_SUITES)
async def test_message_we_encrypt_with_a_branch_key_decrypts(
    suite: AlgorithmSuite, context: Mapping[str, str]
) -> None:
    keyring = StaticBranchKeyring(BRANCH_KEY_ID, {VERSION: BRANCH_KEY}, VERSION)
    async with EnvelopeClient(keyring, algorithm_suite=suite) as client:
        message = await client.encrypt(b"per-record secret", encryption_context=context)
        header = inspect(message)
        [edk] = header.encrypted_data_keys
        assert (edk.provider_id, edk.provider_info) == (PROVIDER_ID, BRANCH_KEY_ID.encode())
        assert branch_key_version_of(edk.ciphertext) == VERSION
        assert await client.decrypt(message, encryption_context=context) == b"per-record secret"


async def test_old_version_decrypts_after_rotation_and_new_messages_use_the_new_one() -> None:
    old = StaticBranchKeyring(BRANCH_KEY_ID, {VERSION: BRANCH_KEY}, VERSION)
    rotated = StaticBranchKeyring(
        BRANCH_KEY_ID, {VERSION: BRANCH_KEY, OTHER_VERSION: OTHER_BRANCH_KEY}, OTHER_VERSION
    )
    async with EnvelopeClient(old) as before, EnvelopeClient(rotated) as after:
        message = await before.encrypt(b"written before", encryption_context={"row": "1"})
        assert await after.decrypt(message) == b"written before"
        newer = await after.encrypt(b"written after", encryption_context={"row": "2"})
        [edk] = inspect(newer).encrypted_data_keys
        assert branch_key_version_of(edk.ciphertext) == OTHER_VERSION
        with pytest.raises(NoUsableKeyError, match=f"version {OTHER_VERSION} is not known"):
            await before.decrypt(newer)


# -- tampering: each is one library error, saying what was wrong ---------------------------

FLIPS = {"salt": 0, "iv": 16, "ciphertext": 44, "tag": 91}


@pytest.mark.parametrize("offset", list(FLIPS.values()), ids=list(FLIPS))
def test_flipped_bit_fails_authentication(offset: int) -> None:
    edk = bytearray(wrapped())
    edk[offset] ^= 0x01
    with pytest.raises(NoUsableKeyError, match="does not authenticate under branch key"):
        unwrap(bytes(edk))


def test_flipped_version_bit_names_another_version() -> None:
    edk = bytearray(wrapped())
    edk[28 + 15] ^= 0x01
    flipped = branch_key_version_of(bytes(edk))
    assert flipped != VERSION
    with pytest.raises(NoUsableKeyError, match=f"names version {flipped} .* not version {VERSION}"):
        unwrap(bytes(edk))
    # Fetched as that version (same key bytes, say): the version is in the AAD.
    with pytest.raises(NoUsableKeyError, match="does not authenticate"):
        unwrap(bytes(edk), version=flipped)


def test_other_branch_key_id_fails_authentication() -> None:
    with pytest.raises(NoUsableKeyError, match="does not authenticate under branch key 'other'"):
        unwrap(wrapped(), branch_key_id="other")


def test_other_version_is_refused_before_any_unwrap() -> None:
    with pytest.raises(
        NoUsableKeyError, match=f"names version {VERSION} .* not version {OTHER_VERSION}"
    ):
        unwrap(wrapped(), branch_key=OTHER_BRANCH_KEY, version=OTHER_VERSION)


def test_other_branch_key_under_the_same_version_fails_authentication() -> None:
    with pytest.raises(NoUsableKeyError, match="does not authenticate"):
        unwrap(wrapped(), branch_key=OTHER_BRANCH_KEY)


@pytest.mark.parametrize(
    "changed",
    [
        {},
        {"tenant": "t-1"},
        {"tenant": "t-2", "row": "1234"},
        {"tenant": "t-1", "row": "1234", "x": ""},
    ],
    ids=["emptied", "pair-dropped", "value-changed", "pair-added"],
)
def test_changed_context_fails_authentication(changed: Mapping[str, str]) -> None:
    with pytest.raises(NoUsableKeyError, match="encryption context differs"):
        unwrap(wrapped(), changed)


@pytest.mark.parametrize("length", [0, 43, 44, 60, 76, 91, 93, 200])
def test_wrong_length_is_refused_as_malformed(length: int) -> None:
    edk = (wrapped() * 3)[:length]
    with pytest.raises(NoUsableKeyError, match=f"is {length} bytes; a 32-byte data key's is 92"):
        unwrap(edk)


def test_edk_of_another_suites_length_is_refused() -> None:
    with pytest.raises(NoUsableKeyError, match="a 16-byte data key's is 76"):
        unwrap(wrapped(), key_length=16)


def test_too_short_to_name_a_version_is_refused() -> None:
    assert branch_key_version_of(bytes(44)) == "00000000-0000-0000-0000-000000000000"
    with pytest.raises(
        NoUsableKeyError, match="43 bytes is too short to name a branch key version"
    ):
        branch_key_version_of(bytes(43))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: wrap_data_key(BRANCH_KEY[:31], "b", VERSION, DATA_KEY, {}),
            "a branch key is 32 bytes",
        ),
        (lambda: wrap_data_key(BRANCH_KEY, "", VERSION, DATA_KEY, {}), "non-empty str"),
        (lambda: wrap_data_key(BRANCH_KEY, "b", VERSION.upper(), DATA_KEY, {}), "lower-case UUID"),
        (lambda: wrap_data_key(BRANCH_KEY, "b", VERSION, DATA_KEY[:31], {}), "16, 24 or 32"),
        (lambda: unwrap(wrapped(), key_length=33), "key_length"),
        (lambda: unwrap(wrapped(), version="latest"), "lower-case UUID"),
    ],
    ids=[
        "short-branch-key",
        "empty-id",
        "upper-case-version",
        "short-data-key",
        "key-length",
        "version",
    ],
)
def test_misuse_is_a_configuration_error(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        call()


def test_no_key_bytes_in_any_error() -> None:
    secrets = [BRANCH_KEY, DATA_KEY]
    edk = wrapped()
    errors: list[Exception] = []
    attempts: list[Callable[[], object]] = [
        lambda: unwrap(edk, {"x": "y"}),
        lambda: unwrap(edk[:-1]),
        lambda: unwrap(edk, version=OTHER_VERSION),
        lambda: wrap_data_key(BRANCH_KEY[:31], "b", VERSION, DATA_KEY, {}),
    ]
    for attempt in attempts:
        with pytest.raises((NoUsableKeyError, ConfigurationError)) as caught:
            attempt()
        errors.append(caught.value)
    for error in errors:
        shown = str(error) + repr(error)
        for secret in secrets:
            assert secret.hex() not in shown
            assert repr(secret)[2:-1] not in shown
            assert repr(secret[:8])[2:-1] not in shown


@settings(max_examples=300, deadline=None)
@given(edk=st.binary(max_size=200), key_length=st.sampled_from([16, 24, 32]))
def test_random_edk_bytes_raise_only_library_errors(edk: bytes, key_length: int) -> None:
    with pytest.raises(NoUsableKeyError):
        unwrap(edk, key_length=key_length)
    if len(edk) < 44:
        with pytest.raises(NoUsableKeyError, match="too short to name a branch key version"):
            branch_key_version_of(edk)
    else:  # any 16 bytes are a UUID to the MPL too: the version to fetch
        assert branch_key_version_of(edk) == str(uuid.UUID(bytes=edk[28:44]))


@settings(max_examples=300, deadline=None)
@given(body=st.binary(min_size=76, max_size=76))
def test_random_edk_of_the_right_length_naming_our_version_fails_authentication(
    body: bytes,
) -> None:
    edk = body[:28] + uuid.UUID(VERSION).bytes + body[28:]
    assert branch_key_version_of(edk) == VERSION
    with pytest.raises(NoUsableKeyError, match="does not authenticate"):
        unwrap(edk)


# -- the (key, IV) seam --------------------------------------------------------------------


class Seals:
    def __init__(self) -> None:
        self.pairs: list[tuple[bytes, bytes]] = []

    def __call__(self, key: bytes, iv: bytes) -> None:
        self.pairs.append((key, iv))


@pytest.fixture
def seals() -> Iterator[Seals]:
    log = Seals()
    with nonce_log.observe_seals(log):
        yield log


def wrapping_key_fingerprint(edk: bytes) -> bytes:
    """The seam's fingerprint of the EDK's wrapping key, recomputed from the reference."""
    label = PROVIDER_ID.encode()
    key = hmac.new(
        BRANCH_KEY, b"\x00\x00\x00\x01" + label + b"\x00" + edk[:16] + b"\x00\x00\x01\x00", "sha256"
    ).digest()
    return hashlib.sha256(key).digest()


def test_seam_sees_every_wrap_with_its_wrapping_key_and_iv(seals: Seals) -> None:
    edks = [wrapped() for _ in range(20)]
    assert seals.pairs == [(wrapping_key_fingerprint(edk), edk[16:28]) for edk in edks]
    assert len(set(seals.pairs)) == 20


async def test_seam_sees_the_wrap_of_every_message(seals: Seals) -> None:
    keyring = StaticBranchKeyring(BRANCH_KEY_ID, {VERSION: BRANCH_KEY}, VERSION)
    async with EnvelopeClient(keyring, frame_length=64) as client:
        messages = [
            await client.encrypt(b"x" * 10, encryption_context={"row": str(i)}) for i in range(10)
        ]
    wraps = [
        (wrapping_key_fingerprint(edk.ciphertext), edk.ciphertext[16:28])
        for message in messages
        for edk in inspect(message).encrypted_data_keys
    ]
    seen = collections.Counter(seals.pairs)
    assert all(seen[pair] == 1 for pair in wraps)
    assert max(seen.values()) == 1
