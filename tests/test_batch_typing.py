"""``run_batch``'s results, as the type checker sees them and as they are at run time.

The README's rotation pattern, ``[r.value for r in results if r.ok]``, must pass
``mypy --strict`` as written: a success and a failure are distinct types, and testing
``ok`` tells the checker which one it has.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from aioenvelope import EnvelopeClient, RawAesKeyring, run_batch
from aioenvelope.batch import BatchFailure, BatchSuccess

REPO = Path(__file__).resolve().parent.parent

# The README's "Key rotation" snippet, annotated as a user of mypy --strict would.
README_PATTERN = """
from aioenvelope import EnvelopeClient, Keyring, run_batch
from aioenvelope.batch import BatchResult


async def rotate(
    client: EnvelopeClient, blobs: list[bytes], new_keyring: Keyring
) -> tuple[list[bytes], list[Exception]]:
    results = await run_batch(
        blobs, lambda blob: client.reencrypt(blob, to_keyring=new_keyring), concurrency=16
    )
    return [r.value for r in results if r.ok], [r.error for r in results if not r.ok]


def items_that_failed(results: list[BatchResult[str, bytes]]) -> dict[str, Exception]:
    failed: dict[str, Exception] = {}
    for result in results:
        if result.ok:
            sealed: bytes = result.value
            assert sealed
        else:
            failed[result.item] = result.error
    return failed
"""


def test_the_readme_pattern_passes_mypy_strict(tmp_path: Path) -> None:
    """Run mypy --strict (with the project's configuration, as a user's CI would see
    the installed package) on the pattern: no error, so no cast or ``assert is not
    None`` is needed to use a success's value or a failure's error."""
    snippet = tmp_path / "rotation.py"
    snippet.write_text(textwrap.dedent(README_PATTERN))
    mypy = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-incremental",
            "--cache-dir",
            os.devnull,
            str(snippet),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert mypy.returncode == 0, mypy.stdout + mypy.stderr
    assert "Success: no issues found in 1 source file" in mypy.stdout


async def test_results_are_successes_and_failures_with_the_same_attributes() -> None:
    """At run time: a success has its value, ``ok`` True and no error; a failure its
    exception, ``ok`` False and no value; the attribute names are the ones every
    result always had (``item``, ``value``, ``error``, ``ok``)."""
    keyring = RawAesKeyring("ns", "key", os.urandom(32))
    async with EnvelopeClient(keyring) as client:
        good = await client.encrypt(b"first")
        results = await run_batch([good, b"not a message"], client.decrypt)

    success, failure = results
    assert isinstance(success, BatchSuccess)
    assert (success.item, success.value, success.error, success.ok) == (
        good,
        b"first",
        None,
        True,
    )
    assert isinstance(failure, BatchFailure)
    assert (failure.item, failure.value, failure.ok) == (b"not a message", None, False)
    assert type(failure.error).__name__ == "MalformedMessageError"
    assert [r.value for r in results if r.ok] == [b"first"]
    assert [r.item for r in results if not r.ok] == [b"not a message"]
