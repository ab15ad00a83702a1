"""The examples run end to end as a user runs them: a subprocess, no AWS configured (the
embedded moto: KMS, DynamoDB and S3)."""

from __future__ import annotations

import contextlib
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cli_runner import clean_env

ROOT = Path(__file__).resolve().parent.parent


def run_example(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(),  # no AWS configured: the embedded KMS
        check=False,
    )


def test_quickstart_runs_against_the_embedded_kms_when_no_key_is_configured() -> None:
    result = run_example("quickstart.py")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "started an embedded KMS (moto) at http://127.0.0.1:" in out
    assert "encrypted and decrypted 1000 records" in out
    assert "data key wrapped by arn:aws:kms:" in out
    assert "tampered record refused" in out
    assert "wrong tenant refused" in out
    # 1,000 records under one context share one data key; the file has its own.
    assert "KMS calls made: 5 (Decrypt 2, DescribeKey 1, GenerateDataKey 2)" in out
    assert "data keys reused for 999 encryptions, cached for 1000 decryptions" in out


@contextlib.contextmanager
def started_service(script: str, *args: str) -> Iterator[tuple[str, list[str]]]:
    """``script`` on a free loopback port with no AWS configured; its URL and the lines
    it has printed so far. Stopped with SIGTERM at the end."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / script), "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=clean_env(),
    )
    lines: list[str] = []
    seen: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            seen.put(line)
        seen.put(None)

    threading.Thread(target=pump, daemon=True).start()
    try:
        url = ""
        deadline = time.monotonic() + 60
        while not url:
            try:
                line = seen.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"{script} did not start:\n{''.join(lines)}")
            if line is None:
                pytest.fail(f"{script} exited ({proc.wait()}):\n{''.join(lines)}")
            if line.startswith("listening on "):
                url = line.removeprefix("listening on ").strip()
        yield url, lines
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("script", ["fastapi_service.py", "aiohttp_service.py"])
def test_a_service_keeps_tenants_records_on_the_embedded_kms_and_dynamodb(
    script: str, tmp_path: Path
) -> None:
    """A first run with no AWS account: the embedded moto serves KMS, DynamoDB and S3;
    the service creates the key store table and a branch key per tenant, and records
    round-trip at one GetItem and one KMS Decrypt per tenant."""
    db = str(tmp_path / "records.db")
    with started_service(script, "--db", db, "--tenants", "default,acme") as (url, lines):
        output = "".join(lines)
        assert "started an embedded KMS, DynamoDB and S3 (moto, in memory)" in output
        assert "branch keys tenant-default (created), tenant-acme (created)" in output
        for i in range(10):
            put = httpx.put(f"{url}/tenants/acme/records/r{i}", json={"i": i})
            assert put.status_code == 204, put.text
            assert httpx.get(f"{url}/tenants/acme/records/r{i}").json() == {"i": i}
        assert httpx.put(f"{url}/records/r0", json={"d": 0}).status_code == 204
        assert httpx.get(f"{url}/records/r0").json() == {"d": 0}
        assert httpx.get(f"{url}/tenants/globex/records/r0").status_code == 404
        records = httpx.get(f"{url}/stats").json()["records"]
        assert records == {"kms_calls": {"Decrypt": 2}, "dynamodb_calls": {"GetItem": 2}}


@pytest.mark.parametrize("tenants", ["", "Acme", "a b", "-x", "a" * 64])
def test_a_service_refuses_a_tenant_name_unfit_for_a_path_or_a_branch_key_id(
    tenants: str,
) -> None:
    """Refused by the command line, before any KMS or DynamoDB is reached."""
    result = run_example("fastapi_service.py", f"--tenants={tenants}")
    assert result.returncode == 2
    assert "tenants are names of a-z, 0-9 and '-'" in result.stderr
