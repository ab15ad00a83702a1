"""Conformance: the AWS Encryption SDK's own decrypt test vectors, read from their zips.

Every ESDK implementation runs these; decrypting them is what "byte-compatible with the
ESDK" means. See ``../shared/esdk-vectors/README.md`` for where they come from.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from esdk_vectors import (
    BUNDLE_NAMES,
    DEFAULT_DIR,
    ENV_VAR,
    EXPECTED_RUN,
    REQUIRE_VAR,
    DecryptVector,
    load_bundle,
    missing_vectors_message,
    raw_keyring,
    vectors_dir,
    vectors_required,
)

from aioenvelope import CommitmentPolicy, EnvelopeClient, Keyring, MultiKeyring, errors

VECTORS_DIR = vectors_dir()
if not VECTORS_DIR.is_dir():
    if os.environ.get(ENV_VAR) or vectors_required():
        # Asked for by name, or by CI: a wrong path must not turn into a quiet skip.
        pytest.fail(
            f"{REQUIRE_VAR if vectors_required() else ENV_VAR} is set, but "
            + missing_vectors_message(VECTORS_DIR),
            pytrace=False,
        )
    pytest.skip(missing_vectors_message(VECTORS_DIR), allow_module_level=True)

# Vectors per bundle and kind, as the README lists them.
EXPECTED_KINDS = {
    "v4-Net-4.0.1.zip": Counter({"aes": 33, "rsa": 66, "aws-kms": 33}),
    "valid-Net-4.0.0.zip": Counter({"aes": 5}),
    "invalid-Net-4.0.0.zip": Counter({"aes": 28}),
}
# Written by ESDK-NET 4.0.0 with two bugs (extra bytes in the header-auth AAD; no message
# ID in the HKDF info of non-committing suites): the manifest says `output`, yet a
# conforming reader must refuse every one of them.
BUGGY_BUNDLE = "invalid-Net-4.0.0.zip"
KMS_SKIP_REASON = (
    "aws-kms vector: decrypting it needs the KMS key in AWS's own test account, "
    "which is not reachable offline"
)

BUNDLES = {name: load_bundle(VECTORS_DIR / name) for name in EXPECTED_KINDS}
ALL_VECTORS = [vector for bundle in BUNDLES.values() for vector in bundle.vectors]
OFFLINE = [vector for vector in ALL_VECTORS if not vector.needs_kms]
DECRYPTABLE = [vector for vector in OFFLINE if vector.bundle != BUGGY_BUNDLE]
BUGGY = [vector for vector in OFFLINE if vector.bundle == BUGGY_BUNDLE]
NEEDS_KMS = [vector for vector in ALL_VECTORS if vector.needs_kms]


def vector_id(vector: DecryptVector) -> str:
    return vector.id


def reading_client(keyring: Keyring) -> EnvelopeClient:
    """Legacy (non-committing) suites allowed: most vectors use them."""
    return EnvelopeClient(keyring, commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_ALLOW_DECRYPT)


# -- the loader reads everything, so a broken one cannot pass by testing less -------------


@pytest.mark.parametrize("bundle_name", EXPECTED_KINDS)
def test_bundle_holds_the_vectors_its_readme_lists(bundle_name: str) -> None:
    """Counts per kind pin the loader: a vector dropped or misfiled fails here."""
    bundle = BUNDLES[bundle_name]
    assert Counter(vector.kind for vector in bundle.vectors) == EXPECTED_KINDS[bundle_name]
    assert len(bundle.vectors) == bundle.ciphertext_files
    assert bundle.client == "ESDK-NET 4.0.0"


def test_every_vector_is_run_exactly_once() -> None:
    """99 + 5 decrypt, 28 are refused, 33 need KMS; ids are unique so each is one test.
    The same figures are what CI's end-of-run tally requires (``EXPECTED_RUN``)."""
    assert (len(DECRYPTABLE), len(BUGGY), len(NEEDS_KMS)) == (104, 28, 33)
    assert tuple(EXPECTED_RUN.values()) == (len(DECRYPTABLE), len(BUGGY), len(NEEDS_KMS))
    assert tuple(EXPECTED_KINDS) == BUNDLE_NAMES
    ids = [vector.id for vector in DECRYPTABLE + BUGGY + NEEDS_KMS]
    assert len(ids) == len(set(ids)) == len(ALL_VECTORS) == 165


def test_every_offline_vector_lists_a_key_that_can_unwrap() -> None:
    """A public-only RSA key cannot decrypt; each vector naming one also names its private half."""
    for vector in OFFLINE:
        keys = [vector.keys[mk.key] for mk in vector.master_keys]
        assert any(key.can_unwrap for key in keys), vector.id
    public_only = [v for v in OFFLINE if any(not v.keys[mk.key].can_unwrap for mk in v.master_keys)]
    assert len(public_only) == 33


def test_vectors_dir_is_overridable_by_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The folder sits beside the project by default; an env var points elsewhere."""
    monkeypatch.setenv(ENV_VAR, os.fspath(tmp_path))
    assert vectors_dir() == tmp_path
    monkeypatch.delenv(ENV_VAR)
    assert vectors_dir() == DEFAULT_DIR
    assert DEFAULT_DIR.parts[-2:] == ("shared", "esdk-vectors")


def run_this_module(tmp_path: Path, env: dict[str, str], *args: str) -> tuple[int, str]:
    """This module in a fresh pytest (so its collection and end-of-run tally are the
    ones under test); the exit status and the output."""
    environ = {k: v for k, v in os.environ.items() if k not in (ENV_VAR, REQUIRE_VAR)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", __file__, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**environ, **env},
        check=False,
    )
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize("how", [ENV_VAR, REQUIRE_VAR])
def test_missing_folder_fails_the_run_when_asked_for_and_says_where_to_get_it(
    tmp_path: Path, how: str
) -> None:
    """CI sets the requirement: a missing folder is an error, not a skip of 165 tests;
    a folder named by the override must exist too."""
    missing = tmp_path / "no-vectors-here"
    env = {ENV_VAR: os.fspath(missing)} if how == ENV_VAR else {REQUIRE_VAR: "1"}
    if how == REQUIRE_VAR:
        env[ENV_VAR] = os.fspath(missing)  # the default folder exists on this machine
    status, output = run_this_module(tmp_path, env, "-k", "overridable")
    assert status == pytest.ExitCode.INTERRUPTED, output  # a collection error
    assert f"{how} is set, but ESDK test vectors not found at {missing}" in output
    assert "https://github.com/aws/aws-encryption-sdk" in output


def test_missing_folder_is_a_skip_that_says_where_to_get_the_vectors() -> None:
    """A fresh clone without the folder (nothing asked for) skips with the way to fix it."""
    message = missing_vectors_message(Path("/nowhere"))
    assert message.startswith("ESDK test vectors not found at /nowhere: get them from ")
    assert "https://github.com/aws/aws-encryption-sdk" in message
    assert "TestVectors/dafny/TestVectors/test/" in message
    assert all(name in message for name in BUNDLE_NAMES)
    assert ENV_VAR in message


def test_required_run_fails_unless_every_vector_ran_and_prints_the_tally(tmp_path: Path) -> None:
    """Counting outcomes: with the folder there but the vector tests deselected, the
    tests that did run pass, yet a required run fails at the end, saying why."""
    status, output = run_this_module(
        tmp_path, {REQUIRE_VAR: "1", ENV_VAR: os.fspath(VECTORS_DIR)}, "-k", "overridable"
    )
    assert "1 passed" in output
    assert status == pytest.ExitCode.TESTS_FAILED, output
    assert "ESDK vectors: 0 decrypted, 0 refused, 0 need AWS KMS (skipped)" in output
    assert (
        f"FAILED: {REQUIRE_VAR} is set, so every vector must run: expected 104 decrypted" in output
    )


# -- one test per vector -----------------------------------------------------------------


@pytest.mark.parametrize("vector", DECRYPTABLE, ids=vector_id)
async def test_vector_decrypts_to_expected_plaintext(vector: DecryptVector) -> None:
    """Another ESDK wrote it, so we must read it back byte for byte."""
    assert vector.expected_plaintext is not None
    async with reading_client(vector.keyring()) as client:
        plaintext = await client.decrypt(
            vector.ciphertext, encryption_context=vector.encryption_context
        )
    assert plaintext == vector.expected_plaintext


@pytest.mark.parametrize("vector", BUGGY, ids=vector_id)
async def test_vector_from_buggy_encrypter_fails_authentication(vector: DecryptVector) -> None:
    """The key unwraps but the header tag cannot verify: refused, whatever the manifest says."""
    async with reading_client(vector.keyring()) as client:
        with pytest.raises(errors.AuthenticationError) as refused:
            await client.decrypt(vector.ciphertext, encryption_context=vector.encryption_context)
    assert type(refused.value) is errors.AuthenticationError
    assert str(refused.value) == (
        "header authentication failed: the header was changed, or the encryption context "
        "or data key is not the one it was written with"
    )


@pytest.mark.parametrize("vector", NEEDS_KMS, ids=vector_id)
def test_kms_vector_needs_aws_test_account(vector: DecryptVector) -> None:
    """Reported as skipped, with why, after checking it really is KMS-only."""
    for master_key in vector.master_keys:
        assert master_key.type == "aws-kms"
        assert vector.keys[master_key.key].key_id.startswith("arn:aws:kms:")
    pytest.skip(KMS_SKIP_REASON)


# -- the manifest's key semantics ---------------------------------------------------------


async def test_public_only_key_listed_first_does_not_block_decryption() -> None:
    """The ESDK tries every listed key; one that cannot unwrap is passed over, not fatal."""
    two_key = [vector for vector in DECRYPTABLE if len(vector.master_keys) == 2]
    assert len(two_key) == 33
    for vector in two_key:
        assert not vector.keys[vector.master_keys[-1].key].can_unwrap, vector.id
        reversed_keys = [raw_keyring(mk, vector.keys[mk.key]) for mk in vector.master_keys[::-1]]
        async with reading_client(MultiKeyring(children=reversed_keys)) as client:
            plaintext = await client.decrypt(
                vector.ciphertext, encryption_context=vector.encryption_context
            )
        assert plaintext == vector.expected_plaintext, vector.id
