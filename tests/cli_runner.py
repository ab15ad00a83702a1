"""Running the ``aioenvelope`` command line as users run it, for the CLI tests.

The installed console script in a subprocess, with an environment stripped of every
``AWS_*`` and ``AIOENVELOPE_*`` variable (so nothing reaches real AWS, and each test says
exactly how KMS is reached), and the checks every CLI test makes of a run: success is
exit status 0 with nothing on stderr, a failure is exit status 1 and one readable line
per error. :func:`kms_cli` is the command line every KMS test file uses; :func:`without`
hides an installed package from it (a missing extra); :func:`on_a_terminal` and
:func:`terminal` put its stderr or stdout on a pseudo-terminal.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import sysconfig
import termios
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from esdk_peer import peer_keys, raw_aes_key
from kms_server import DUMMY_CREDENTIALS, REGION, MotoKms

from aioenvelope import RawAesKeyring

__all__ = [
    "COMMAND",
    "ERROR_PREFIX",
    "Cli",
    "RawKeyFile",
    "clean_env",
    "cloud_env",
    "failed",
    "keygen",
    "kms_cli",
    "listing",
    "ok",
    "on_a_terminal",
    "terminal",
    "vault_env",
    "without",
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
        self,
        *args: str | Path,
        stdin: bytes = b"",
        stdout: int = subprocess.PIPE,
        stderr: int = subprocess.PIPE,
        cwd: Path | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [*COMMAND, *map(str, args)],
            input=stdin,
            stdout=stdout,
            stderr=stderr,
            cwd=cwd,
            env=self.env,
            timeout=60,
            check=False,
        )


def kms_cli(moto_kms: MotoKms) -> Cli:
    """The command line reaching the moto KMS (and DynamoDB) with dummy credentials:
    never real ones, so nothing may reach AWS."""
    env = clean_env()
    env.update(DUMMY_CREDENTIALS)
    return Cli(env, ("--endpoint-url", moto_kms.endpoint_url, "--region", REGION))


def without(cli: Cli, packages: tuple[str, ...], directory: Path) -> Cli:
    """``cli`` as on a machine where ``packages`` are not installed: a ``sitecustomize``
    in ``directory`` (put first on PYTHONPATH) sets them to None in ``sys.modules``, which
    is how Python marks a module as not importable (``import`` raises
    ModuleNotFoundError), before the console script imports anything."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in packages)
    )
    path = os.pathsep.join(filter(None, [str(directory), cli.env.get("PYTHONPATH")]))
    return replace(cli, env={**cli.env, "PYTHONPATH": path})


def vault_env(cli: Cli, **settings: str) -> Cli:
    """``cli`` with no ``VAULT_*`` or ``BAO_*`` variable but ``settings`` (``VAULT_ADDR=``,
    ``BAO_TOKEN=``...): each Vault test says how the server and the token are found."""
    env = {k: v for k, v in cli.env.items() if not k.startswith(("VAULT_", "BAO_"))}
    return replace(cli, env={**env, **settings})


def cloud_env(cli: Cli, **settings: str) -> Cli:
    """``cli`` with no Google or Azure credential setting (``GOOGLE_*``, ``AZURE_*``, the
    managed-identity ``IDENTITY_*``/``MSI_*``/``IMDS_*``) but ``settings``: each Cloud KMS
    or Key Vault test says how its credentials are found."""
    prefixes = ("GOOGLE_", "GCLOUD_", "CLOUDSDK_", "AZURE_", "IDENTITY_", "MSI_", "IMDS_")
    env = {k: v for k, v in cli.env.items() if not k.startswith(prefixes)}
    return replace(cli, env={**env, **settings})


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


@dataclass
class Terminal:
    """A new 80-column pseudo-terminal: ``fd`` is its end a child process writes to;
    :meth:`shown` closes that end and returns everything written to it."""

    fd: int
    parent: int

    def shown(self) -> bytes:
        os.close(self.fd)
        self.fd = -1
        shown = b""
        while True:
            try:
                data = os.read(self.parent, 4096)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not data:
                break
            shown += data
        return shown


@contextlib.contextmanager
def terminal() -> Iterator[Terminal]:
    parent, child = pty.openpty()
    # A new pseudo-terminal is 0 columns wide, and tqdm draws nothing in 0 columns.
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    opened = Terminal(child, parent)
    try:
        yield opened
    finally:
        if opened.fd != -1:
            os.close(opened.fd)
        os.close(parent)


def on_a_terminal(cli: Cli, *args: str | Path) -> tuple[int, bytes]:
    """Run with stderr on a new 80-column pseudo-terminal (as a person watching would);
    the exit status and everything shown on that terminal."""
    with terminal() as tty:
        result = cli(*args, stderr=tty.fd)
        return result.returncode, tty.shown()
