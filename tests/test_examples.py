"""The examples run end to end as a user runs them: a subprocess, no AWS configured."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
