"""examples/batch_job.py, run as a user runs it: a subprocess against the moto KMS server.

The table is seeded here, not by the example, so the round trip is checked against values
the example never saw (non-ASCII, quotes). Each run costs a second or more (moto answers
each KMS call in ~10 ms), so module fixtures share the encrypted and the rotated table.
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_runner import clean_env
from kms_server import DUMMY_CREDENTIALS, REGION, KmsKey, MotoKms

import aioenvelope
from aioenvelope import EnvelopeClient, KmsKeyring, errors, inspect

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "batch_job.py"
CONTEXT = {"table": "customers"}
ROWS = 300


@dataclass(frozen=True)
class Job:
    env: dict[str, str]
    kms: tuple[str, ...]  # --endpoint-url URL --region REGION

    def __call__(self, step: str, db: Path, *args: str) -> subprocess.CompletedProcess[str]:
        """Run one step of the example, as a user would."""
        return subprocess.run(
            [sys.executable, str(EXAMPLE), step, "--db", str(db), *self.kms, *args],
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


def kms_calls(run: subprocess.CompletedProcess[str]) -> list[dict[str, int]]:
    """The ``kms_calls Op=N ...`` line of each step, parsed."""
    lines = re.findall(r"^kms_calls(.*)$", run.stdout, re.MULTILINE)
    return [{op: int(n) for op, n in (p.split("=") for p in line.split())} for line in lines]


def sealed(path: Path) -> dict[int, bytes]:
    with sqlite3.connect(path) as db:
        return dict(db.execute("SELECT id, sealed FROM customers"))


def copy(table: Table, tmp_path: Path) -> Path:
    return Path(shutil.copy(table.path, tmp_path / "copy.db"))


def keyring(moto_kms: MotoKms, key: KmsKey) -> KmsKeyring:
    return KmsKeyring(key.arn, region_name=REGION, endpoint_url=moto_kms.endpoint_url)


def expected(row_id: int) -> dict[str, object]:
    """The test's own seed row, as the example seals it."""
    return {"id": row_id, "email": f"clé-{row_id}@exämple.org", "card": f"'{row_id:016d}'"}


@pytest.fixture(scope="module")
def job(moto_kms: MotoKms) -> Job:
    env = clean_env()
    env.update(DUMMY_CREDENTIALS)  # never real credentials: nothing may reach AWS
    return Job(env, ("--endpoint-url", moto_kms.endpoint_url, "--region", REGION))


@pytest.fixture(scope="module")
def encrypted(job: Job, kms_key: KmsKey, tmp_path_factory: pytest.TempPathFactory) -> Table:
    """ROWS rows sealed under key A, 8 at a time, 128 rows per transaction."""
    path = tmp_path_factory.mktemp("batch") / "customers.db"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE customers (id INTEGER PRIMARY KEY, email TEXT, card TEXT, sealed BLOB)"
        )
        rows = [expected(i) for i in range(1, ROWS + 1)]
        db.executemany("INSERT INTO customers VALUES (:id, :email, :card, NULL)", rows)
    args = ("--key-id", kms_key.arn, "--concurrency", "8", "--chunk-size", "128")
    return Table(path, job("encrypt", path, *args))


@pytest.fixture(scope="module")
def rotated(
    job: Job,
    encrypted: Table,
    kms_key: KmsKey,
    kms_key_2: KmsKey,
    tmp_path_factory: pytest.TempPathFactory,
) -> Table:
    path = Path(shutil.copy(encrypted.path, tmp_path_factory.mktemp("batch") / "rotated.db"))
    return Table(path, job("rotate", path, "--key-id", kms_key.arn, "--to-key-id", kms_key_2.arn))


async def test_encrypt_seals_every_row_under_the_key_and_clears_its_plaintext(
    encrypted: Table, moto_kms: MotoKms, kms_key: KmsKey
) -> None:
    assert encrypted.run.returncode == 0, encrypted.run.stderr
    assert f"encrypt: {ROWS} rows, 0 failed" in encrypted.run.stdout
    with sqlite3.connect(encrypted.path) as db:
        assert db.execute(
            "SELECT count(*) FROM customers WHERE email IS NOT NULL OR card IS NOT NULL"
        ).fetchone() == (0,)
    blobs = sealed(encrypted.path)
    assert len(blobs) == ROWS
    async with EnvelopeClient(keyring(moto_kms, kms_key)) as client:
        for row_id, blob in blobs.items():
            record = json.loads(await client.decrypt(blob, encryption_context=CONTEXT))
            assert record == expected(row_id)


def test_encrypt_makes_one_kms_call_for_the_whole_table(encrypted: Table) -> None:
    """The data-key cache at work: every row shares one data key (and the context that
    KMS sees), so 300 rows cost one GenerateDataKey and no Decrypt."""
    [calls] = kms_calls(encrypted.run)
    assert calls == {"DescribeKey": 1, "GenerateDataKey": 1}  # the start-up key check


async def test_rotate_reencrypts_every_row_under_the_new_key_which_alone_reads_it(
    encrypted: Table, rotated: Table, moto_kms: MotoKms, kms_key: KmsKey, kms_key_2: KmsKey
) -> None:
    assert rotated.run.returncode == 0, rotated.run.stderr
    assert f"rotate: {ROWS} rows, 0 failed" in rotated.run.stdout
    before, after = sealed(encrypted.path), sealed(rotated.path)
    assert after.keys() == before.keys()
    async with (
        EnvelopeClient(keyring(moto_kms, kms_key_2)) as new_only,
        EnvelopeClient(keyring(moto_kms, kms_key)) as old_only,
    ):
        for row_id, blob in after.items():
            old = before[row_id]
            record = json.loads(await new_only.decrypt(blob, encryption_context=CONTEXT))
            assert record == expected(row_id)
            with pytest.raises(errors.NoUsableKeyError):
                await old_only.decrypt(blob)
            header = inspect(blob)
            assert header.message_id != inspect(old).message_id  # a new message
            wrapped_by = [edk.provider_info.decode() for edk in header.encrypted_data_keys]
            assert wrapped_by == [kms_key_2.arn]
            old_body = old[aioenvelope.inspect(old).header_length :]
            assert blob[aioenvelope.inspect(blob).header_length :] != old_body
    assert len({inspect(blob).message_id for blob in after.values()}) == ROWS
    # The whole table shares one data key of the new key (the target's data-key cache).
    assert len({inspect(blob).encrypted_data_keys for blob in after.values()}) == 1


def test_rotate_makes_one_decrypt_and_one_generate_data_key_for_the_whole_table(
    rotated: Table,
) -> None:
    """300 rows sharing one old data key: one Decrypt under the old key (then cached),
    one GenerateDataKey under the new key (its data key cached and reused by every new
    message). DescribeKey is the start-up check of each key of each keyring: the
    client's reads old and new (so a rerun handles rows already rotated), the target
    has the new. No Encrypt: a new data key is generated, the old one never wrapped."""
    [calls] = kms_calls(rotated.run)
    assert calls == {"Decrypt": 1, "DescribeKey": 3, "GenerateDataKey": 1}


def test_a_failed_row_is_reported_by_id_and_the_others_still_go_through(
    job: Job, encrypted: Table, kms_key: KmsKey, kms_key_2: KmsKey, tmp_path: Path
) -> None:
    """Row 42's header is corrupt and row 99's body is cut short (reencrypt, which
    verifies the old message to its end, and decrypt refuse both); row 8 holds row 7's
    message (well-formed, so it rotates, but verify sees it belongs elsewhere)."""
    path = copy(encrypted, tmp_path)
    blobs = sealed(path)
    corrupt = bytearray(blobs[42])
    corrupt[10] ^= 0x01  # inside the message ID, which the header tag covers
    cut = blobs[99][:-5]  # inside the final frame's tag
    with sqlite3.connect(path) as db:
        db.executemany(
            "UPDATE customers SET sealed = ? WHERE id = ?",
            [(bytes(corrupt), 42), (blobs[7], 8), (cut, 99)],
        )

    rotation = job("rotate", path, "--key-id", kms_key.arn, "--to-key-id", kms_key_2.arn)
    assert rotation.returncode == 1
    row_42, row_99 = rotation.stderr.splitlines()
    assert row_42.startswith("rotate: row 42 failed: AuthenticationError")
    assert row_99.startswith("rotate: row 99 failed: TruncatedMessageError")
    assert f"rotate: {ROWS} rows, 2 failed" in rotation.stdout
    after = sealed(path)
    assert after[42] == bytes(corrupt)  # left as it was
    assert after[99] == cut
    assert all(
        inspect(after[i]).encrypted_data_keys[0].provider_info.decode() == kms_key_2.arn
        for i in after
        if i not in (42, 99)
    )

    check = job("verify", path, "--key-id", kms_key_2.arn)
    assert check.returncode == 1
    row_8, row_42, row_99 = check.stderr.splitlines()  # in id order
    assert row_8 == "verify: row 8 failed: ValueError: sealed record belongs to row 7"
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


def test_demo_encrypts_rotates_and_verifies_on_the_embedded_kms(tmp_path: Path) -> None:
    no_aws = Job(clean_env(), ())  # no AWS configured: the embedded KMS
    result = no_aws("demo", tmp_path / "demo.db", "--rows", "50")
    assert result.returncode == 0, result.stderr
    assert "started an embedded KMS (moto) at http://127.0.0.1:" in result.stdout
    for step in ("encrypt", "rotate", "verify"):
        assert f"{step}: 50 rows, 0 failed" in result.stdout
    encrypt, rotate, verify = kms_calls(result)
    assert encrypt == {"DescribeKey": 1, "GenerateDataKey": 1}
    # One data key to unwrap, cached for the other 49 rows; one new data key, cached for
    # all 50 likewise; no Encrypt: the old data key is never wrapped anew. DescribeKey:
    # each keyring's start-up check, as in the rotation of the table above.
    assert rotate == {"Decrypt": 1, "DescribeKey": 3, "GenerateDataKey": 1}
    assert verify == {"Decrypt": 1, "DescribeKey": 1}  # one data key, then cached
