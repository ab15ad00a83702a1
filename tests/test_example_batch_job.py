"""examples/batch_job.py, run as a user runs it: a subprocess against the moto server (KMS,
and DynamoDB for the branch keys, on the same endpoint).

The table is seeded here, not by the example, so the round trip is checked against values
the example never saw (non-ASCII, quotes). Each run costs a second or more, so module
fixtures share the encrypted and the rotated table, and one key store table (its own,
fresh for this module) holds the branch keys of every run.
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_runner import clean_env
from kms_server import DUMMY_CREDENTIALS, REGION, KmsKey, MotoKms

from aioenvelope import BranchKeyStore, EnvelopeClient, HierarchicalKeyring, errors, inspect

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "batch_job.py"
ROWS = 300
BRANCH_KEY = "customers"  # the example's default --branch-key-id
NEW_BRANCH_KEY = "customers-rotated"
KEY_STORE_NAME = "aioenvelope-batch"  # the example's default --key-store-name


@dataclass(frozen=True)
class Job:
    env: dict[str, str]
    aws: tuple[str, ...]  # --endpoint-url URL --region REGION --key-store-table TABLE

    def __call__(self, step: str, db: Path, *args: str) -> subprocess.CompletedProcess[str]:
        """Run one step of the example, as a user would."""
        return subprocess.run(
            [sys.executable, str(EXAMPLE), step, "--db", str(db), *self.aws, *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=120,
            check=False,
        )


@dataclass(frozen=True)
class Table:
    path: Path
    run: subprocess.CompletedProcess[str]  # the run that produced it


def step_calls(run: subprocess.CompletedProcess[str], service: str) -> list[dict[str, int]]:
    """The ``<service> Op=N ...`` line of each step (``kms_calls``, ``dynamodb_calls``),
    parsed."""
    lines = re.findall(rf"^{service}(.*)$", run.stdout, re.MULTILINE)
    return [{op: int(n) for op, n in (p.split("=") for p in line.split())} for line in lines]


def kms_calls(run: subprocess.CompletedProcess[str]) -> list[dict[str, int]]:
    return step_calls(run, "kms_calls")


def dynamodb_calls(run: subprocess.CompletedProcess[str]) -> list[dict[str, int]]:
    return step_calls(run, "dynamodb_calls")


def sealed(path: Path) -> dict[int, bytes]:
    with sqlite3.connect(path) as db:
        return dict(db.execute("SELECT id, sealed FROM customers"))


def set_sealed(path: Path, blobs: dict[int, bytes]) -> None:
    with sqlite3.connect(path) as db:
        db.executemany(
            "UPDATE customers SET sealed = ? WHERE id = ?", [(b, i) for i, b in blobs.items()]
        )


def copy(table: Table, tmp_path: Path) -> Path:
    return Path(shutil.copy(table.path, tmp_path / "copy.db"))


def row_context(row_id: int) -> dict[str, str]:
    """What the example binds each row's message to."""
    return {"table": "customers", "row_id": str(row_id)}


def expected(row_id: int) -> dict[str, object]:
    """The test's own seed row, as the example seals it."""
    return {"id": row_id, "email": f"clé-{row_id}@exämple.org", "card": f"'{row_id:016d}'"}


@pytest.fixture(scope="module")
def key_store_table() -> str:
    return f"batch-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def job(moto_kms: MotoKms, key_store_table: str) -> Job:
    env = clean_env()
    env.update(DUMMY_CREDENTIALS)  # never real credentials: nothing may reach AWS
    aws = ("--endpoint-url", moto_kms.endpoint_url, "--region", REGION)
    return Job(env, (*aws, "--key-store-table", key_store_table))


@pytest.fixture
def branch_keyring(
    make_branch_key_store: Callable[..., BranchKeyStore], key_store_table: str
) -> Callable[[KmsKey, str], HierarchicalKeyring]:
    """``branch_keyring(kms_key, branch_key_id)``: a reader of the example's key store,
    made here through the public API, as another program would."""

    def make(kms_key: KmsKey, branch_key_id: str) -> HierarchicalKeyring:
        store = make_branch_key_store(
            key_store_table, logical_key_store_name=KEY_STORE_NAME, kms_key_id=kms_key.arn
        )
        return HierarchicalKeyring(store, branch_key_id=branch_key_id)

    return make


@pytest.fixture(scope="module")
def encrypted(job: Job, kms_key: KmsKey, tmp_path_factory: pytest.TempPathFactory) -> Table:
    """ROWS rows sealed under branch key BRANCH_KEY (under key A), 8 at a time, 128 rows
    per transaction."""
    path = tmp_path_factory.mktemp("batch") / "customers.db"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE customers (id INTEGER PRIMARY KEY, email TEXT, card TEXT, sealed BLOB)"
        )
        rows = [expected(i) for i in range(1, ROWS + 1)]
        db.executemany("INSERT INTO customers VALUES (:id, :email, :card, NULL)", rows)
    args = ("--key-id", kms_key.arn, "--concurrency", "8", "--chunk-size", "128")
    return Table(path, job("encrypt", path, *args))


def rotate(
    job: Job, path: Path, kms_key: KmsKey, kms_key_2: KmsKey
) -> subprocess.CompletedProcess[str]:
    """BRANCH_KEY (under key A) -> NEW_BRANCH_KEY (under key B)."""
    return job(
        "rotate",
        path,
        *("--key-id", kms_key.arn, "--to-key-id", kms_key_2.arn),
        *("--to-branch-key-id", NEW_BRANCH_KEY),
    )


@pytest.fixture(scope="module")
def rotated(
    job: Job,
    encrypted: Table,
    kms_key: KmsKey,
    kms_key_2: KmsKey,
    tmp_path_factory: pytest.TempPathFactory,
) -> Table:
    path = Path(shutil.copy(encrypted.path, tmp_path_factory.mktemp("batch") / "rotated.db"))
    return Table(path, rotate(job, path, kms_key, kms_key_2))


async def test_encrypt_seals_every_row_bound_to_its_id_and_clears_its_plaintext(
    encrypted: Table,
    kms_key: KmsKey,
    branch_keyring: Callable[[KmsKey, str], HierarchicalKeyring],
) -> None:
    """The row's ID is in each message's encryption context (stored, so any reader sees
    it), and each message has a data key of its own, wrapped by the branch key."""
    assert encrypted.run.returncode == 0, encrypted.run.stderr
    assert f"encrypt: {ROWS} rows, 0 failed" in encrypted.run.stdout
    with sqlite3.connect(encrypted.path) as db:
        assert db.execute(
            "SELECT count(*) FROM customers WHERE email IS NOT NULL OR card IS NOT NULL"
        ).fetchone() == (0,)
    blobs = sealed(encrypted.path)
    assert len(blobs) == ROWS
    async with EnvelopeClient(branch_keyring(kms_key, BRANCH_KEY)) as client:
        for row_id, blob in blobs.items():
            header = inspect(blob)
            assert header.encryption_context == row_context(row_id)
            [edk] = header.encrypted_data_keys
            assert (edk.provider_id, edk.provider_info) == ("aws-kms-hierarchy", b"customers")
            record = json.loads(await client.decrypt(blob, encryption_context=row_context(row_id)))
            assert record == expected(row_id)
    assert len({inspect(blob).encrypted_data_keys for blob in blobs.values()}) == ROWS


def test_encrypt_fetches_the_branch_key_once_for_the_whole_table(encrypted: Table) -> None:
    """300 rows, 300 contexts: one GetItem and one KMS Decrypt (the branch key, then
    cached), where a KMS keyring would make a GenerateDataKey per context. Creating the
    table and the branch key is the example's set-up, outside the step's client."""
    assert kms_calls(encrypted.run) == [{"Decrypt": 1}]
    assert dynamodb_calls(encrypted.run) == [{"GetItem": 1}]
    assert f"branch key {BRANCH_KEY} under " in encrypted.run.stdout
    assert "(created)" in encrypted.run.stdout


async def test_a_rows_ciphertext_moved_to_another_row_fails_to_decrypt_there(
    job: Job, encrypted: Table, kms_key: KmsKey, tmp_path: Path
) -> None:
    """Rows 7 and 8 swapped: each message is whole and under the right branch key, but
    its encryption context names the other row, so verify refuses both (the context
    check, before any key is fetched) and passes every other row."""
    path = copy(encrypted, tmp_path)
    blobs = sealed(path)
    set_sealed(path, {7: blobs[8], 8: blobs[7]})

    check = job("verify", path, "--key-id", kms_key.arn)
    assert check.returncode == 1
    assert check.stderr.splitlines() == [
        f"verify: row {row} failed: EncryptionContextMismatchError: encryption context "
        "value for key 'row_id' does not match the message"
        for row in (7, 8)
    ]
    assert f"verify: {ROWS} rows, 2 failed" in check.stdout
    assert kms_calls(check) == [{"Decrypt": 1}]  # the other 298 rows: one fetch
    assert dynamodb_calls(check) == [{"GetItem": 1}]

    # Put back, they read again: nothing but the row they sit in was wrong.
    set_sealed(path, {7: blobs[7], 8: blobs[8]})
    assert job("verify", path, "--key-id", kms_key.arn).returncode == 0


async def test_rotate_reencrypts_every_row_under_the_new_branch_key_which_alone_reads_it(
    encrypted: Table,
    rotated: Table,
    kms_key: KmsKey,
    kms_key_2: KmsKey,
    branch_keyring: Callable[[KmsKey, str], HierarchicalKeyring],
) -> None:
    assert rotated.run.returncode == 0, rotated.run.stderr
    assert f"rotate: {ROWS} rows, 0 failed" in rotated.run.stdout
    before, after = sealed(encrypted.path), sealed(rotated.path)
    assert after.keys() == before.keys()
    async with (
        EnvelopeClient(branch_keyring(kms_key_2, NEW_BRANCH_KEY)) as new_only,
        EnvelopeClient(branch_keyring(kms_key, BRANCH_KEY)) as old_only,
    ):
        for row_id, blob in after.items():
            old = before[row_id]
            context = row_context(row_id)
            record = json.loads(await new_only.decrypt(blob, encryption_context=context))
            assert record == expected(row_id)
            with pytest.raises(errors.NoUsableKeyError):
                await old_only.decrypt(blob)
            header = inspect(blob)
            assert header.encryption_context == context  # still bound to its row
            assert header.message_id != inspect(old).message_id  # a new message
            wrapped_by = [edk.provider_info.decode() for edk in header.encrypted_data_keys]
            assert wrapped_by == [NEW_BRANCH_KEY]
            assert blob[header.header_length :] != old[inspect(old).header_length :]
    assert len({inspect(blob).message_id for blob in after.values()}) == ROWS
    assert len({inspect(blob).encrypted_data_keys for blob in after.values()}) == ROWS


def test_rotate_fetches_each_branch_key_once_for_the_whole_table(rotated: Table) -> None:
    """300 rows: the old branch key's version fetched once to read them (a GetItem and a
    KMS Decrypt under key A), the new one's active version once to seal them (the same
    under key B). The new branch key is created, under key B, by the example's set-up."""
    assert kms_calls(rotated.run) == [{"Decrypt": 2}]
    assert dynamodb_calls(rotated.run) == [{"GetItem": 2}]
    assert f"branch key {NEW_BRANCH_KEY} under " in rotated.run.stdout


def test_a_failed_row_is_reported_by_id_and_the_others_still_go_through(
    job: Job, encrypted: Table, kms_key: KmsKey, kms_key_2: KmsKey, tmp_path: Path
) -> None:
    """Row 42's header is corrupt and row 99's body is cut short (reencrypt, which
    verifies the old message to its end, and decrypt refuse both); row 8 holds row 7's
    message, whose context names row 7: refused by both steps too."""
    path = copy(encrypted, tmp_path)
    blobs = sealed(path)
    corrupt = bytearray(blobs[42])
    corrupt[10] ^= 0x01  # inside the message ID, which the header tag covers
    cut = blobs[99][:-5]  # inside the final frame's tag
    set_sealed(path, {42: bytes(corrupt), 8: blobs[7], 99: cut})

    rotation = rotate(job, path, kms_key, kms_key_2)
    assert rotation.returncode == 1
    row_8, row_42, row_99 = rotation.stderr.splitlines()  # in id order
    assert row_8.startswith("rotate: row 8 failed: EncryptionContextMismatchError")
    assert row_42.startswith("rotate: row 42 failed: AuthenticationError")
    assert row_99.startswith("rotate: row 99 failed: TruncatedMessageError")
    assert f"rotate: {ROWS} rows, 3 failed" in rotation.stdout
    after = sealed(path)
    assert (after[8], after[42], after[99]) == (blobs[7], bytes(corrupt), cut)  # as they were
    assert all(
        inspect(after[i]).encrypted_data_keys[0].provider_info.decode() == NEW_BRANCH_KEY
        for i in after
        if i not in (8, 42, 99)
    )

    check = job("verify", path, "--key-id", kms_key_2.arn, "--branch-key-id", NEW_BRANCH_KEY)
    assert check.returncode == 1
    row_8, row_42, row_99 = check.stderr.splitlines()
    assert row_8.startswith("verify: row 8 failed: EncryptionContextMismatchError")
    assert row_42.startswith("verify: row 42 failed: ")
    assert row_99.startswith("verify: row 99 failed: ")
    assert f"verify: {ROWS} rows, 3 failed" in check.stdout


def test_a_step_without_a_kms_key_refuses_to_run_rather_than_seal_under_a_throwaway_key(
    tmp_path: Path,
) -> None:
    """An embedded KMS would vanish with the process, and the data with it."""
    result = Job(clean_env(), ())("encrypt", tmp_path / "x.db")
    assert result.returncode == 2
    assert "encrypt needs --key-id" in result.stderr
    assert not (tmp_path / "x.db").exists()


def test_rotate_without_a_target_branch_key_is_refused(tmp_path: Path, kms_key: KmsKey) -> None:
    """Rotation moves rows to another branch key: it needs one, and its KMS key."""
    run = Job(clean_env(), ())
    for target in ((), ("--to-branch-key-id", NEW_BRANCH_KEY), ("--to-key-id", kms_key.arn)):
        result = run("rotate", tmp_path / "x.db", "--key-id", kms_key.arn, *target)
        assert result.returncode == 2
        assert "rotate needs --to-key-id and --to-branch-key-id" in result.stderr
    same = ("--to-key-id", kms_key.arn, "--to-branch-key-id", BRANCH_KEY)
    result = run("rotate", tmp_path / "x.db", "--key-id", kms_key.arn, *same)
    assert result.returncode == 2
    assert "another branch key" in result.stderr
    assert not (tmp_path / "x.db").exists()


def test_demo_encrypts_rotates_and_verifies_on_the_embedded_kms(tmp_path: Path) -> None:
    no_aws = Job(clean_env(), ())  # no AWS configured: the embedded KMS and DynamoDB
    result = no_aws("demo", tmp_path / "demo.db", "--rows", "50")
    assert result.returncode == 0, result.stderr
    assert "started an embedded KMS and DynamoDB (moto) at http://127.0.0.1:" in result.stdout
    for step in ("encrypt", "rotate", "verify"):
        assert f"{step}: 50 rows, 0 failed" in result.stdout
    # One branch key fetch per branch key a step uses, for 50 rows as for 300: encrypt
    # seals under the old, rotate reads the old and seals under the new, verify reads
    # the new.
    assert kms_calls(result) == [{"Decrypt": 1}, {"Decrypt": 2}, {"Decrypt": 1}]
    assert dynamodb_calls(result) == [{"GetItem": 1}, {"GetItem": 2}, {"GetItem": 1}]
