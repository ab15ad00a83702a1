"""The command line's hierarchical keyring: ``--branch-key-id`` and the key store options
on encrypt, decrypt and as reencrypt targets, and ``aioenvelope branch-key``; run as users
run it (the console script in a subprocess, see test_cli.py) against the moto server,
which serves DynamoDB as well as KMS.

Subprocesses cost most of a second each, so the key store every test but the
administration one uses is set up in process, with the library, and results are checked
in process where the command line adds nothing (reading a header, a decrypt).
"""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
from cli_runner import ERROR_PREFIX, Cli, clean_env, failed, kms_cli, listing, ok
from kms_server import REGION, KmsKey, MotoKms
from moto_keyrings import moto_kms_keyring, shared_session

from aioenvelope import BranchKeyStore, EnvelopeClient, HierarchicalKeyring, Keyring, inspect
from aioenvelope.keyrings.hierarchy import wrapping

STORE_NAME = "cli-test-store"


@dataclass(frozen=True)
class KeyStore:
    """A key store table on moto, with branch key ``tenant-a``."""

    table: str
    kms_key: KmsKey
    endpoint_url: str

    def flags(self, prefix: str = "") -> tuple[str, ...]:
        """``--[to-]key-store-table T --[to-]key-store-name N --[to-]key-store-kms-key K``."""
        return (
            f"--{prefix}key-store-table",
            self.table,
            f"--{prefix}key-store-name",
            STORE_NAME,
            f"--{prefix}key-store-kms-key",
            self.kms_key.arn,
        )

    def store(self) -> BranchKeyStore:
        """The same store, in process."""
        return BranchKeyStore(
            self.table,
            logical_key_store_name=STORE_NAME,
            kms_key_id=self.kms_key.arn,
            session=shared_session(),
            region_name=REGION,
            endpoint_url=self.endpoint_url,
        )

    def keyring(self, branch_key_id: str = "tenant-a") -> HierarchicalKeyring:
        return HierarchicalKeyring(self.store(), branch_key_id=branch_key_id)


@pytest.fixture(scope="module")
def cli(moto_kms: MotoKms) -> Cli:
    return kms_cli(moto_kms)


@pytest.fixture(scope="module")
def key_store(moto_kms: MotoKms, kms_key: KmsKey) -> KeyStore:
    key_store = KeyStore(f"cli-hk-{uuid.uuid4().hex[:10]}", kms_key, moto_kms.endpoint_url)

    async def create() -> None:
        async with key_store.store() as store:
            await store.create_table()
            await store.create_branch_key("tenant-a")

    anyio.run(create)
    return key_store


def the_edk(path: Path) -> tuple[str, bytes]:
    """The message's only EDK: (provider ID, provider info)."""
    (edk,) = inspect(path.read_bytes()).encrypted_data_keys
    return edk.provider_id, edk.provider_info


def branch_key_version(path: Path) -> str:
    """The branch key version the message's only EDK was wrapped under."""
    (edk,) = inspect(path.read_bytes()).encrypted_data_keys
    return wrapping.branch_key_version_of(edk.ciphertext)


def decrypt(keyring: Keyring, path: Path) -> bytes:
    """``path`` decrypted in process."""

    async def run(message: bytes) -> bytes:
        async with EnvelopeClient(keyring) as client:
            return await client.decrypt(message)

    return anyio.run(run, path.read_bytes())


def test_branch_key_create_table_create_show_and_rotate_administer_a_key_store(
    cli: Cli, kms_key: KmsKey, moto_kms: MotoKms
) -> None:
    table = f"cli-admin-{uuid.uuid4().hex[:10]}"
    store = ("--key-store-table", table, "--key-store-name", STORE_NAME, "--kms-key", kms_key.arn)

    created = ok(
        cli(
            "branch-key",
            "create-table",
            "--key-store-table",
            table,
            "--kms-key",
            kms_key.arn,
            *cli.kms,
        )
    )
    assert created.stdout.decode().strip().endswith(f":table/{table}")

    made = ok(cli("branch-key", "create", *store, "-c", "dept=billing", *cli.kms))
    branch_key_id = made.stdout.decode().strip()
    assert str(uuid.UUID(branch_key_id)) == branch_key_id  # no ID given: a random UUID
    assert failed(
        cli("branch-key", "create", *store, "--branch-key-id", branch_key_id, *cli.kms)
    ) == [
        f"{ERROR_PREFIX}branch key {branch_key_id!r} already exists in table {table!r}: "
        "create_branch_key never overwrites one (rotate it with rotate_branch_key, or "
        "choose another ID)"
    ]

    shown = json.loads(
        ok(cli("branch-key", "show", *store, "--branch-key-id", branch_key_id, *cli.kms)).stdout
    )
    first = shown["active_version"]
    assert shown == {
        "branch_key_id": branch_key_id,
        "active_version": first,
        "encryption_context": {"dept": "billing"},
        "key_store": {"table": table, "logical_name": STORE_NAME, "kms_key_arn": kms_key.arn},
    }

    rotated = ok(cli("branch-key", "rotate", *store, "--branch-key-id", branch_key_id, *cli.kms))
    second = rotated.stdout.decode().strip()
    assert str(uuid.UUID(second)) == second != first

    shown_raw = ok(
        cli(
            "branch-key",
            "show",
            *store,
            "--branch-key-id",
            branch_key_id,
            "--branch-key-version",
            first,
            *cli.kms,
        )
    ).stdout
    shown = json.loads(shown_raw)
    assert shown["active_version"] == second
    assert shown["version"] == {
        "version": first,
        "encryption_context": {"dept": "billing"},
        "active": False,
    }

    # The library reads what the command line wrote; neither key appears in what show
    # printed, in any of the encodings a careless printer would use.
    async def keys() -> list[bytes]:
        async with BranchKeyStore(
            table,
            logical_key_store_name=STORE_NAME,
            kms_key_id=kms_key.arn,
            session=shared_session(),
            region_name=REGION,
            endpoint_url=moto_kms.endpoint_url,
        ) as library:
            active = await library.get_active_branch_key(branch_key_id)
            old = await library.get_branch_key_version(branch_key_id, first)
            assert (active.version, dict(active.encryption_context)) == (
                second,
                {"dept": "billing"},
            )
            return [bytes(active.key), bytes(old.key)]

    for key in anyio.run(keys):
        for shown_key in (key.hex(), base64.b64encode(key).decode(), repr(key)):
            assert shown_key not in shown_raw.decode()


def test_per_file_contexts_encrypt_under_a_branch_key_and_decrypt_across_a_rotation(
    cli: Cli, key_store: KeyStore, tmp_path: Path
) -> None:
    """The issue's spelling (``--kms-key`` names the key store's key) and the explicit
    one (``--key-store-kms-key``) both select the branch key alone: one EDK."""
    issue_spelling = (
        "--branch-key-id",
        "tenant-a",
        "--key-store-table",
        key_store.table,
        "--key-store-name",
        STORE_NAME,
        "--kms-key",
        key_store.kms_key.arn,
    )
    records = {"a": b"row a\n", "b": b"row b\n", "c": b"row c\n"}
    for name, data in records.items():
        (tmp_path / name).write_bytes(data)
    for name in ("a", "b"):
        ok(
            cli(
                "encrypt",
                tmp_path / name,
                "-o",
                tmp_path,
                "-c",
                f"record={name}",
                *issue_spelling,
                *cli.kms,
            )
        )
        assert the_edk(tmp_path / f"{name}.encrypted") == ("aws-kms-hierarchy", b"tenant-a")
        assert inspect((tmp_path / f"{name}.encrypted").read_bytes()).encryption_context == {
            "record": name
        }
    before = branch_key_version(tmp_path / "a.encrypted")
    assert branch_key_version(tmp_path / "b.encrypted") == before

    async def rotate() -> str:
        async with key_store.store() as store:
            return await store.rotate_branch_key("tenant-a")

    after = anyio.run(rotate)
    ok(
        cli(
            "encrypt",
            tmp_path / "c",
            "-o",
            tmp_path,
            "-c",
            "record=c",
            "--branch-key-id",
            "tenant-a",
            *key_store.flags(),
            *cli.kms,
        )
    )
    # inspect names the branch key and the version, to find messages under an old one.
    header = json.loads(ok(cli("inspect", tmp_path / "c.encrypted")).stdout)
    assert header["encrypted_data_keys"] == [
        {
            "provider_id": "aws-kms-hierarchy",
            "provider_info": "tenant-a",
            "branch_key_version": after,
            "encrypted_data_key_length": wrapping.edk_length(32),
        }
    ]
    assert after != before

    # A message written before the rotation decrypts, with its context checked.
    out = tmp_path / "out"
    out.mkdir()
    ok(
        cli(
            "decrypt",
            tmp_path / "a.encrypted",
            "-o",
            out,
            "-c",
            "record=a",
            "--branch-key-id",
            "tenant-a",
            *key_store.flags(),
            *cli.kms,
        )
    )
    assert (out / "a").read_bytes() == records["a"]
    for name in ("b", "c"):
        assert decrypt(key_store.keyring(), tmp_path / f"{name}.encrypted") == (records[name])

    # Record b's blob presented as record a's: refused, nothing written.
    assert failed(
        cli(
            "decrypt",
            tmp_path / "b.encrypted",
            "-o",
            out / "b",
            "-c",
            "record=a",
            *issue_spelling,
            *cli.kms,
        )
    ) == [f"{ERROR_PREFIX}encryption context value for key 'record' does not match the message"]
    assert listing(out) == {"a"}


def test_key_store_kms_key_leaves_kms_key_to_add_a_kms_keyring(
    cli: Cli, key_store: KeyStore, kms_key_2: KmsKey, moto_kms: MotoKms, tmp_path: Path
) -> None:
    """With the store's key named by --key-store-kms-key, --kms-key adds a KMS keyring
    (a MultiKeyring): the branch key first, and the KMS key alone decrypts."""
    (tmp_path / "p").write_bytes(b"both")
    ok(
        cli(
            "encrypt",
            tmp_path / "p",
            "-o",
            tmp_path / "m",
            "--branch-key-id",
            "tenant-a",
            *key_store.flags(),
            "--kms-key",
            kms_key_2.arn,
            *cli.kms,
        )
    )
    edks = inspect((tmp_path / "m").read_bytes()).encrypted_data_keys
    assert [(e.provider_id, e.provider_info) for e in edks] == [
        ("aws-kms-hierarchy", b"tenant-a"),
        ("aws-kms", kms_key_2.arn.encode()),
    ]
    assert decrypt(moto_kms_keyring(moto_kms, kms_key_2.arn), tmp_path / "m") == b"both"
    assert decrypt(key_store.keyring(), tmp_path / "m") == b"both"


def test_reencrypt_from_a_kms_key_to_a_branch_key_and_back(
    cli: Cli,
    key_store: KeyStore,
    kms_key: KmsKey,
    kms_key_2: KmsKey,
    moto_kms: MotoKms,
    tmp_path: Path,
) -> None:
    plaintext = b"rotate me" * 1000
    context = {"tenant": "t1"}

    async def encrypt() -> bytes:
        async with EnvelopeClient(moto_kms_keyring(moto_kms, kms_key.arn)) as client:
            return await client.encrypt(plaintext, encryption_context=context)

    (tmp_path / "kms").write_bytes(anyio.run(encrypt))
    ok(
        cli(
            "reencrypt",
            tmp_path / "kms",
            "-o",
            tmp_path / "branch",
            "-c",
            "tenant=t1",
            "--kms-key",
            kms_key.arn,
            "--to-branch-key-id",
            "tenant-a",
            *key_store.flags("to-"),
            *cli.kms,
        )
    )
    assert the_edk(tmp_path / "branch") == ("aws-kms-hierarchy", b"tenant-a")
    assert decrypt(key_store.keyring(), tmp_path / "branch") == plaintext

    # And back: the branch key as the source; without --to-branch-key-id, --to-kms-key
    # is a KMS key as always (an alias is fine there).
    ok(
        cli(
            "reencrypt",
            tmp_path / "branch",
            "-o",
            tmp_path / "back",
            "-c",
            "tenant=t1",
            "--branch-key-id",
            "tenant-a",
            *key_store.flags(),
            "--to-kms-key",
            kms_key_2.alias_name,
            *cli.kms,
        )
    )
    assert the_edk(tmp_path / "back") == ("aws-kms", kms_key_2.arn.encode())
    assert inspect((tmp_path / "back").read_bytes()).encryption_context == context
    back = decrypt(moto_kms_keyring(moto_kms, kms_key_2.arn), tmp_path / "back")
    assert back == plaintext


KEY = "arn:aws:kms:us-west-2:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
STORE = ("--key-store-table", "t-table", "--key-store-name", "n")
USAGE_ERRORS = {
    "branch-key-id-alone": (
        ("encrypt", "--branch-key-id", "tenant-a"),
        "--branch-key-id needs --key-store-table TABLE, --key-store-name NAME, the key "
        "store's KMS key (--key-store-kms-key ARN)",
    ),
    "store-without-branch-key": (
        ("encrypt", "--key-store-table", "t-table", "--kms-key", KEY),
        "--key-store-table is for a branch key: give --branch-key-id ID",
    ),
    "two-kms-keys-no-store-key": (
        ("encrypt", "--branch-key-id", "b", *STORE, "--kms-key", KEY, "--kms-key", KEY),
        "with --branch-key-id, --kms-key names the key store's KMS key, and 2 were given: "
        "name the key store's key with --key-store-kms-key ARN; each --kms-key then adds "
        "a KMS keyring",
    ),
    "alias-as-store-key": (
        ("decrypt", "--branch-key-id", "b", *STORE, "--kms-key", "alias/branch-keys"),
        "--kms-key (with --branch-key-id) must be the key store's KMS key ARN "
        "(arn:aws:kms:REGION:ACCOUNT:key/ID), not 'alias/branch-keys'",
    ),
    "target-incomplete": (
        ("reencrypt", "--kms-key", KEY, "--to-branch-key-id", "b", "--to-key-store-table", "t"),
        "--to-branch-key-id needs --to-key-store-name NAME, the key store's KMS key "
        "(--to-key-store-kms-key ARN)",
    ),
    "branch-key-alias": (
        ("branch-key", "create", *STORE, "--kms-key", "alias/branch-keys"),
        "--key-store-kms-key must be the key store's KMS key ARN "
        "(arn:aws:kms:REGION:ACCOUNT:key/ID), not 'alias/branch-keys'",
    ),
}


@pytest.mark.parametrize("case", USAGE_ERRORS)
def test_incomplete_or_ambiguous_key_store_options_are_usage_errors(
    case: str, tmp_path: Path
) -> None:
    """Exit 2, the command's usage and one line saying what to add, before any file or
    AWS service is touched (no endpoint is given: a call would fail otherwise)."""
    args, message = USAGE_ERRORS[case]
    command = args[0] if args[0] != "branch-key" else f"branch-key {args[1]}"
    source = tmp_path / "in"
    source.write_bytes(b"x")
    io = (source, "-o", tmp_path / "out") if args[0] != "branch-key" else ()
    result = Cli(clean_env())(*args[:1], *io, *args[1:])
    lines = result.stderr.decode().splitlines()
    assert result.returncode == 2, lines
    assert lines[0].startswith(f"usage: aioenvelope {command} ")
    assert lines[-1] == f"aioenvelope {command}: error: {message}"
    assert listing(tmp_path) == {"in"}
