"""``--gcp-key`` and ``--azure-key`` on the command line: the installed console script in a
subprocess, as users run it, against the Cloud KMS fake (``gcp_kms_fake``, served here
from a thread of its own, since the command blocks this one) and the Key Vault fake
(``azure_kv_fake``), with moto for the KMS side of mixed keys.

How the subprocess reaches the fakes is how a user reaches an emulator or a private
endpoint: ``--gcp-endpoint 127.0.0.1:PORT`` (plaintext gRPC, anonymous credentials, on
loopback only); ``--azure-ca-file`` and ``--azure-no-challenge-resource-check`` for the
vault, whose token comes from azure-identity's own ``DefaultAzureCredential`` through the
App Service managed-identity variables (``IDENTITY_ENDPOINT``, ``IDENTITY_HEADER``)
pointing at a token endpoint served here. Nothing in the command is swapped for a test.

What is pinned: round trips under each; a Cloud KMS key with a KMS key, each able to
decrypt alone; re-encryption from KMS to either; a missing key failing the start-up check
in one line of the command line's words, and ``--no-check-keys`` skipping that check;
the challenge check's advice as its flag; options without their key, malformed key
names and a missing extra as one-line errors; ``inspect`` naming the keys.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from azure_kv_fake import AzureKeyVaultFake
from cli_runner import Cli, cloud_env, failed, kms_cli, ok, without
from gcp_kms_fake import GcpKmsFake
from kms_server import KmsKey, MotoKms

from aioenvelope import inspect

CONTEXT = ("-c", "tenant=t1", "-c", "purpose=cli-cloud")
PLAINTEXT = b"a record sealed under a cloud key from the command line\n" * 40
MISSING_GCP_KEY = "projects/test-project/locations/global/keyRings/test-ring/cryptoKeys/absent"
IDENTITY_HEADER = "cli-cloud-identity-header"


class ThreadedGcpKms:
    """The Cloud KMS fake on an event loop of its own thread, so that it answers while
    the test waits for a subprocess."""

    def __init__(self) -> None:
        self.fake = GcpKmsFake()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> GcpKmsFake:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.fake.__aenter__(), self._loop).result(30)
        return self.fake

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.fake.__aexit__(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop.close()


class TokenEndpoint:
    """An App Service managed-identity token endpoint (what ``IDENTITY_ENDPOINT`` names)
    handing out the Key Vault fake's token to a request carrying ``IDENTITY_HEADER``."""

    def __init__(self, token: str) -> None:
        self.requests = 0
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                endpoint.requests += 1
                if self.headers.get("X-IDENTITY-HEADER") != IDENTITY_HEADER:
                    self.send_error(401)
                    return
                body = json.dumps(
                    {
                        "access_token": token,
                        "expires_on": str(int(time.time()) + 3600),
                        "resource": "https://vault.azure.net",
                        "token_type": "Bearer",
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/msi/token"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> TokenEndpoint:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(30)


@dataclass(frozen=True)
class Clouds:
    """Both fakes, a key in each, and the command line reaching them: ``gcp`` and
    ``azure`` are the flags that name the key and reach its service."""

    cli: Cli
    gcp_kms: GcpKmsFake
    azure_kv: AzureKeyVaultFake
    gcp_key: str
    azure_key: str
    kms: MotoKms

    @property
    def gcp(self) -> tuple[str, ...]:
        return ("--gcp-key", self.gcp_key, "--gcp-endpoint", self.gcp_kms.address)

    @property
    def azure_connection(self) -> tuple[str, ...]:
        return (
            "--azure-ca-file",
            str(self.azure_kv.ca_path),
            "--azure-no-challenge-resource-check",
        )

    @property
    def azure(self) -> tuple[str, ...]:
        return ("--azure-key", self.azure_key, *self.azure_connection)

    def encrypt(self, *keys: str) -> bytes:
        result = ok(self.cli("encrypt", "-", "-o", "-", *keys, *CONTEXT, stdin=PLAINTEXT))
        return result.stdout

    def decrypt(self, blob: bytes, *keys: str) -> bytes:
        return ok(self.cli("decrypt", "-", "-o", "-", *keys, *CONTEXT, stdin=blob)).stdout


@pytest.fixture(scope="module")
def clouds(moto_kms: MotoKms) -> Iterator[Clouds]:
    with (
        ThreadedGcpKms() as gcp_kms,
        AzureKeyVaultFake() as azure_kv,
        TokenEndpoint(azure_kv.token) as tokens,
    ):
        cli = cloud_env(
            kms_cli(moto_kms), IDENTITY_ENDPOINT=tokens.url, IDENTITY_HEADER=IDENTITY_HEADER
        )
        yield Clouds(
            cli,
            gcp_kms,
            azure_kv,
            gcp_kms.create_key("cli-cloud"),
            azure_kv.create_key("cli-cloud"),
            moto_kms,
        )


def providers(blob: bytes) -> list[tuple[str, str]]:
    return [
        (edk.provider_id, edk.provider_info.decode()) for edk in inspect(blob).encrypted_data_keys
    ]


def test_a_gcp_key_round_trips_through_the_endpoint_flag(clouds: Clouds) -> None:
    """--gcp-key with --gcp-endpoint on loopback reaches the service with no credentials
    to find: the key is checked, wraps and unwraps, and the message names the key."""
    before = clouds.gcp_kms.calls.copy()
    blob = clouds.encrypt(*clouds.gcp)
    assert providers(blob) == [("gcp-kms", clouds.gcp_key)]
    assert clouds.decrypt(blob, *clouds.gcp) == PLAINTEXT
    calls = clouds.gcp_kms.calls - before
    assert calls["Encrypt"] == 1
    assert calls["Decrypt"] == 1
    assert calls["GetCryptoKey"] == 2  # the start-up check, once per command


def test_an_azure_key_round_trips_with_the_default_credential(clouds: Clouds) -> None:
    """--azure-key with the vault's CA and the challenge flag: DefaultAzureCredential
    finds its token (a managed identity here), the vault wraps and unwraps, and the
    message names the key's version."""
    blob = clouds.encrypt(*clouds.azure)
    version = clouds.azure_kv.current_version("cli-cloud")
    assert providers(blob) == [("azure-kv", f"{clouds.azure_key}/{version}")]
    assert clouds.decrypt(blob, *clouds.azure) == PLAINTEXT
    counts = clouds.azure_kv.requests("cli-cloud")
    assert counts["wrapkey"] >= 1
    assert counts["unwrapkey"] >= 1


def test_a_gcp_key_and_a_kms_key_each_decrypt_alone(clouds: Clouds, kms_key: KmsKey) -> None:
    """Several kinds of key combine into one multi-keyring: the KMS key (first) generates
    the data key, the Cloud KMS key wraps it too, and either opens the message alone."""
    blob = clouds.encrypt("--kms-key", kms_key.arn, *clouds.gcp, *clouds.cli.kms)
    assert [p for p, _ in providers(blob)] == ["aws-kms", "gcp-kms"]
    assert clouds.decrypt(blob, "--kms-key", kms_key.arn, *clouds.cli.kms) == PLAINTEXT
    assert clouds.decrypt(blob, *clouds.gcp) == PLAINTEXT


def test_reencrypt_from_a_kms_key_to_an_azure_key_and_to_a_gcp_key(
    clouds: Clouds, kms_key: KmsKey
) -> None:
    """Key rotation across services: a KMS message re-encrypted under --to-azure-key (the
    vault reached with the shared --azure-* flags) and under --to-gcp-key opens with that
    key alone and names only it."""
    sealed = clouds.encrypt("--kms-key", kms_key.arn, *clouds.cli.kms)
    source = ("--kms-key", kms_key.arn, *clouds.cli.kms, *CONTEXT)
    to_azure = ok(
        clouds.cli(
            "reencrypt", "-", "-o", "-", *source, "--to-azure-key", clouds.azure_key,
            *clouds.azure_connection, stdin=sealed,
        )
    ).stdout  # fmt: skip
    assert [p for p, _ in providers(to_azure)] == ["azure-kv"]
    assert clouds.decrypt(to_azure, *clouds.azure) == PLAINTEXT
    to_gcp = ok(
        clouds.cli(
            "reencrypt", "-", "-o", "-", *source, "--to-gcp-key", clouds.gcp_key,
            "--gcp-endpoint", clouds.gcp_kms.address, stdin=sealed,
        )
    ).stdout  # fmt: skip
    assert providers(to_gcp) == [("gcp-kms", clouds.gcp_key)]
    assert clouds.decrypt(to_gcp, *clouds.gcp) == PLAINTEXT


def test_a_missing_gcp_key_fails_the_check_in_flags_and_no_check_keys_skips_it(
    clouds: Clouds,
) -> None:
    """A key that does not exist fails the start-up check as one line advising
    --no-check-keys (not check_keys=False); with --no-check-keys no GetCryptoKey is made
    and the key fails at its first use instead."""
    keys = ("--gcp-key", MISSING_GCP_KEY, "--gcp-endpoint", clouds.gcp_kms.address)
    (line,) = failed(clouds.cli("encrypt", "-", "-o", "-", *keys, stdin=b"x"))
    assert "start-up check" in line
    assert MISSING_GCP_KEY in line
    assert "--no-check-keys" in line
    assert "check_keys=" not in line
    before = clouds.gcp_kms.calls.copy()
    (line,) = failed(clouds.cli("encrypt", "-", "-o", "-", *keys, "--no-check-keys", stdin=b"x"))
    calls = clouds.gcp_kms.calls - before
    assert calls["GetCryptoKey"] == 0
    assert calls["Encrypt"] == 1
    assert "start-up check" not in line
    assert "NOT_FOUND" in line


def test_a_missing_azure_key_fails_the_check_in_flags(clouds: Clouds) -> None:
    """A Key Vault key that does not exist is one line naming the key and advising
    --no-check-keys, in flags."""
    missing = f"{clouds.azure_kv.url}/keys/absent"
    result = clouds.cli(
        "encrypt", "-", "-o", "-", "--azure-key", missing, *clouds.azure_connection, stdin=b"x"
    )
    (line,) = failed(result)
    assert missing in line
    assert "--no-check-keys" in line
    assert "check_keys=" not in line
    assert "credential=" not in line


def test_a_vault_outside_azure_domains_needs_the_challenge_flag_named_in_the_error(
    clouds: Clouds,
) -> None:
    """Without --azure-no-challenge-resource-check, the fake's challenge (resource
    vault.azure.net, host 127.0.0.1) is refused: the error names the flag, not
    client_options= nor the SDK's verify_challenge_resource=False."""
    result = clouds.cli(
        "encrypt", "-", "-o", "-", "--azure-key", clouds.azure_key,
        "--azure-ca-file", clouds.azure_kv.ca_path, stdin=b"x",
    )  # fmt: skip
    (line,) = failed(result)
    assert "--azure-no-challenge-resource-check" in line
    assert "client_options" not in line
    assert "verify_challenge_resource" not in line  # nor the SDK's own Python advice


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (("--raw-key-file", "k", "--gcp-endpoint", "127.0.0.1:1"), "--gcp-endpoint is for"),
        (("--raw-key-file", "k", "--azure-ca-file", "ca.pem"), "--azure-ca-file is for"),
        (
            ("--raw-key-file", "k", "--azure-no-challenge-resource-check"),
            "--azure-no-challenge-resource-check is for",
        ),
        (("--gcp-key", "projects/p/keyRings/r"), "is not a Cloud KMS key name"),
        (
            ("--gcp-key", f"{MISSING_GCP_KEY}/cryptoKeyVersions/1"),
            "name the key, not one of its versions",
        ),
        (("--azure-key", "http://vault.example/keys/k"), "is not a Key Vault key URL"),
        (("--gcp-key", MISSING_GCP_KEY, "--gcp-endpoint", "nowhere"), "expected HOST:PORT"),
    ],
    ids=[
        "endpoint-alone",
        "ca-alone",
        "challenge-alone",
        "gcp-name",
        "gcp-version",
        "azure-url",
        "endpoint-form",
    ],
)
def test_cloud_options_that_cannot_work_are_usage_errors(
    clouds: Clouds, tmp_path: Path, args: tuple[str, ...], said: str
) -> None:
    """A cloud option without its key, or a key name of the wrong form, is a usage error
    (status 2) before any key or file is touched."""
    (tmp_path / "k").write_text("{}")
    result = clouds.cli("encrypt", "-", "-o", "-", *args, stdin=b"x", cwd=tmp_path)
    assert result.returncode == 2, result.stderr.decode()
    assert said in result.stderr.decode()


def test_a_missing_extra_names_the_pip_install(clouds: Clouds, tmp_path: Path) -> None:
    """Without google-cloud-kms (or azure-keyvault-keys) the command is one line naming
    the extra to install."""
    no_gcp = without(clouds.cli, ("google.cloud.kms_v1",), tmp_path / "no-gcp")
    (line,) = failed(no_gcp("encrypt", "-", "-o", "-", *clouds.gcp, stdin=b"x"))
    assert "pip install 'aioenvelope[gcp]'" in line
    no_azure = without(clouds.cli, ("azure.keyvault.keys",), tmp_path / "no-azure")
    (line,) = failed(no_azure("encrypt", "-", "-o", "-", *clouds.azure, stdin=b"x"))
    assert "pip install 'aioenvelope[azure]'" in line


def test_inspect_names_the_gcp_key_and_the_azure_key_and_version(clouds: Clouds) -> None:
    """``inspect`` shows a Cloud KMS EDK's key name and a Key Vault EDK's vault, key and
    version as text, to find the messages under a key."""
    blob = clouds.encrypt(*clouds.gcp, *clouds.azure)
    shown = json.loads(ok(clouds.cli("inspect", "-", stdin=blob)).stdout)
    gcp_edk, azure_edk = shown["encrypted_data_keys"]
    assert gcp_edk["provider_id"] == "gcp-kms"
    assert gcp_edk["provider_info"] == clouds.gcp_key
    version = clouds.azure_kv.current_version("cli-cloud")
    assert azure_edk["provider_id"] == "azure-kv"
    assert azure_edk["provider_info"] == f"{clouds.azure_key}/{version}"
    assert azure_edk["azure_vault"] == clouds.azure_kv.url
    assert azure_edk["azure_key"] == "cli-cloud"
    assert azure_edk["azure_key_version"] == version
