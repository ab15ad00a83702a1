"""Running the ``aioenvelope`` command line as users run it, for the CLI tests.

The installed console script in a subprocess, with an environment stripped of every
``AWS_*`` and ``AIOENVELOPE_*`` variable (so nothing reaches real AWS, and each test says
exactly how KMS is reached), and the checks every CLI test makes of a run: success is
exit status 0 with nothing on stderr, a failure is exit status 1 and one readable line
per error.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import sysconfig
import termios
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esdk_peer import peer_keys, raw_aes_key

from aioenvelope import RawAesKeyring

__all__ = [
    "COMMAND",
    "ERROR_PREFIX",
    "Cli",
    "RawKeyFile",
    "clean_env",
    "failed",
    "keygen",
    "listing",
    "ok",
    "on_a_terminal",
]


def _command() -> list[str]:
    """The console script pip installed beside this interpreter (what users run); the
    module if the package was not installed with its scripts."""
    script = Path(sysconfig.get_path("scripts")) / "aioenvelope"
    return [str(script)] if script.exists() else [sys.executable, "-m", "aioenvelope.cli"]


COMMAND = _command()
ERROR_PREFIX = "aioenvelope: error: "


def clean_env() -> dict[str, str]:
    """This process's environment without any AWS or aioenvelope setting."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "AIOENVELOPE_"))}


@dataclass(frozen=True)
class Cli:
    """The command line with one environment; ``kms`` are the arguments that reach the
    moto KMS (``--endpoint-url URL --region REGION``), empty where no KMS is used."""

    env: dict[str, str]
    kms: tuple[str, ...] = ()

    def __call__(
        self, *args: str | Path, stdin: bytes = b"", stderr: int = subprocess.PIPE
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [*COMMAND, *map(str, args)],
            input=stdin,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=self.env,
            timeout=60,
            check=False,
        )


@dataclass(frozen=True)
class RawKeyFile:
    """A key file ``aioenvelope keygen`` wrote, and what it holds."""

    path: Path
    namespace: str
    name: str
    key: bytes

    def keyring(self) -> RawAesKeyring:
        """The same key for the library, in process."""
        return RawAesKeyring(self.namespace, self.name, self.key)

    def esdk(self) -> Any:
        """The same key as an ESDK master key provider."""
        return peer_keys(raw_aes_key(self.namespace, self.name, self.key))


def keygen(cli: Cli, path: Path) -> RawKeyFile:
    """A new key file at ``path``, made by the command line's own ``keygen``."""
    ok(cli("keygen", "-o", path))
    document = json.loads(path.read_text())
    assert document["type"] == "aioenvelope-raw-aes"
    assert document["namespace"] == "aioenvelope"
    return RawKeyFile(
        path, document["namespace"], document["name"], base64.b64decode(document["key"])
    )


def ok(result: subprocess.CompletedProcess[bytes]) -> subprocess.CompletedProcess[bytes]:
    assert result.returncode == 0, result.stderr.decode()
    assert result.stderr == b""  # nothing on stderr when it is a pipe: no progress bar
    return result


def failed(result: subprocess.CompletedProcess[bytes], *, lines: int = 1) -> list[str]:
    """Exit status 1 and ``lines`` readable error lines, no traceback."""
    errors = result.stderr.decode().splitlines()
    assert result.returncode == 1, errors
    assert len(errors) == lines, errors
    assert all(line.startswith(ERROR_PREFIX) for line in errors), errors
    return errors


def listing(root: Path) -> set[str]:
    """Every file and directory under ``root`` (temporary files would show up here)."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def on_a_terminal(cli: Cli, *args: str | Path) -> tuple[int, bytes]:
    """Run with stderr on a new 80-column pseudo-terminal (as a person watching would);
    the exit status and everything shown on that terminal."""
    parent, child = pty.openpty()
    # A new pseudo-terminal is 0 columns wide, and tqdm draws nothing in 0 columns.
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    try:
        result = cli(*args, stderr=child)
        os.close(child)
        shown = b""
        while True:
            try:
                data = os.read(parent, 4096)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not data:
                break
            shown += data
    finally:
        os.close(parent)
    return result.returncode, shown
