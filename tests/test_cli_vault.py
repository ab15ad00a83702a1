"""``--vault-key`` on the command line, against the real OpenBao dev server (and moto for
the KMS side of mixed keys): the installed console script in a subprocess, as users run
it.

What is pinned: round trips with the token from the environment (VAULT_* or BAO_*) or
from ``--vault-token-file``; several Vault keys, and Vault with KMS, each able to
decrypt alone; re-encryption from KMS to Vault and back; failures as one line in the
command line's words (flags, never ``mount=`` or ``check_keys=False``), never showing the
token; ``--no-check-keys`` skipping the key read; ``inspect`` naming the Vault key.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
from cli_runner import Cli, failed, kms_cli, ok, vault_env
from kms_server import KmsKey, MotoKms
from moto_keyrings import moto_kms_keyring
from vault_server import VaultServer

from aioenvelope import EnvelopeClient, Keyring, VaultTransitKeyring, inspect

CONTEXT = ("-c", "tenant=t1", "-c", "purpose=cli-vault")
PLAINTEXT = b"a record sealed under a Vault transit key from the command line\n" * 40


@dataclass(frozen=True)
class Vault:
    """The dev server as the tests reach it: two fresh keys, and the command line with
    VAULT_ADDR and VAULT_TOKEN (the root token) set, plus moto's flags in ``cli.kms``."""

    server: VaultServer
    cli: Cli
    key_a: str
    key_b: str

    def keyring(self, key: str) -> VaultTransitKeyring:
        return VaultTransitKeyring(key, url=self.server.url, token=self.server.root_token)


@pytest.fixture(scope="module")
def vault(vault_server: VaultServer, moto_kms: MotoKms) -> Vault:
    cli = vault_env(
        kms_cli(moto_kms), VAULT_ADDR=vault_server.url, VAULT_TOKEN=vault_server.root_token
    )
    return Vault(vault_server, cli, vault_server.create_key(), vault_server.create_key())


@pytest.fixture(scope="module")
def sealed(vault: Vault) -> bytes:
    """PLAINTEXT encrypted under key A, the server and token from VAULT_ADDR/VAULT_TOKEN."""
    result = ok(
        vault.cli("encrypt", "-", "-o", "-", "--vault-key", vault.key_a, *CONTEXT, stdin=PLAINTEXT)
    )
    return result.stdout


def edks(blob: bytes) -> list[tuple[str, str]]:
    return [
        (edk.provider_id, edk.provider_info.decode()) for edk in inspect(blob).encrypted_data_keys
    ]


def decrypt_with(keyring: Keyring, blob: bytes) -> bytes:
    """``blob`` opened in process (a second reader besides the command line)."""

    async def run() -> bytes:
        async with EnvelopeClient(keyring) as client:
            return await client.decrypt(
                blob, encryption_context=dict(pair(c) for c in CONTEXT[1::2])
            )

    return anyio.run(run)


def pair(text: str) -> tuple[str, str]:
    key, _, value = text.partition("=")
    return key, value


def token_file(directory: Path, token: str) -> Path:
    """A token file as ``vault login`` or Vault Agent leaves it: the token and a newline."""
    path = directory / "vault-token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


# -- round trips ---------------------------------------------------------------------------


def test_a_vault_key_round_trips_with_the_token_from_the_environment_or_a_file(
    vault: Vault, sealed: bytes, tmp_path: Path
) -> None:
    """The message names the mount and key (not the server); it decrypts with the token
    from VAULT_TOKEN, from BAO_ADDR/BAO_TOKEN (OpenBao's names), and from
    --vault-token-file with --vault-url and no Vault variable at all; the library opens
    it too."""
    assert edks(sealed) == [("vault-transit", f"transit/{vault.key_a}")]
    decrypt = ("decrypt", "-", "-o", "-", "--vault-key", vault.key_a, *CONTEXT)

    assert ok(vault.cli(*decrypt, stdin=sealed)).stdout == PLAINTEXT
    bao = vault_env(vault.cli, BAO_ADDR=vault.server.url, BAO_TOKEN=vault.server.root_token)
    assert ok(bao(*decrypt, stdin=sealed)).stdout == PLAINTEXT
    by_file = vault_env(vault.cli)
    token = token_file(tmp_path, vault.server.root_token)
    flags = (
        "--vault-url",
        vault.server.url,
        "--vault-token-file",
        token,
        "--vault-mount",
        "transit",
    )
    assert ok(by_file(*decrypt, *flags, stdin=sealed)).stdout == PLAINTEXT
    assert decrypt_with(vault.keyring(vault.key_a), sealed) == PLAINTEXT


def test_two_vault_keys_each_decrypt_alone(vault: Vault) -> None:
    """Repeated --vault-key: the first generates the data key, the second wraps it too,
    and either one alone decrypts."""
    keys = ("--vault-key", vault.key_a, "--vault-key", vault.key_b)
    blob = ok(vault.cli("encrypt", "-", "-o", "-", *keys, *CONTEXT, stdin=PLAINTEXT)).stdout
    assert edks(blob) == [
        ("vault-transit", f"transit/{vault.key_a}"),
        ("vault-transit", f"transit/{vault.key_b}"),
    ]
    for key in (vault.key_b, vault.key_a):
        decrypt = ("decrypt", "-", "-o", "-", "--vault-key", key, *CONTEXT)
        assert ok(vault.cli(*decrypt, stdin=blob)).stdout == PLAINTEXT


def test_a_vault_key_and_a_kms_key_each_decrypt_alone(vault: Vault, kms_key: KmsKey) -> None:
    """--kms-key and --vault-key combine: the KMS key comes first (it generates), the
    Vault key wraps the same data key, and either alone decrypts."""
    keys = ("--vault-key", vault.key_a, "--kms-key", kms_key.arn, *vault.cli.kms)
    blob = ok(vault.cli("encrypt", "-", "-o", "-", *keys, *CONTEXT, stdin=PLAINTEXT)).stdout
    assert edks(blob) == [("aws-kms", kms_key.arn), ("vault-transit", f"transit/{vault.key_a}")]
    by_kms = ("--kms-key", kms_key.alias_name, *vault.cli.kms)
    for key in (("--vault-key", vault.key_a), by_kms):
        decrypt = ("decrypt", "-", "-o", "-", *key, *CONTEXT)
        assert ok(vault.cli(*decrypt, stdin=blob)).stdout == PLAINTEXT


def test_reencrypt_from_a_kms_key_to_a_vault_key_and_back(
    vault: Vault, moto_kms: MotoKms, kms_key: KmsKey, kms_key_2: KmsKey, tmp_path: Path
) -> None:
    """To Vault, with the new key's server and token given only as --to-vault-url and
    --to-vault-token-file (no Vault variable set); then back to another KMS key with the
    Vault key as the source. Each result has only the new key, which opens it."""
    kms = vault.cli.kms
    (tmp_path / "kms").write_bytes(
        ok(
            vault.cli(
                "encrypt", "-", "-o", "-", "--kms-key", kms_key.arn, *kms, *CONTEXT, stdin=PLAINTEXT
            )
        ).stdout
    )
    token = token_file(tmp_path, vault.server.root_token)
    no_vault_variables = vault_env(vault.cli)
    ok(
        no_vault_variables(
            "reencrypt",
            tmp_path / "kms",
            "-o",
            tmp_path / "vault",
            *CONTEXT,
            "--kms-key",
            kms_key.arn,
            *kms,
            "--to-vault-key",
            vault.key_b,
            "--to-vault-url",
            vault.server.url,
            "--to-vault-token-file",
            token,
        )
    )
    moved = (tmp_path / "vault").read_bytes()
    assert edks(moved) == [("vault-transit", f"transit/{vault.key_b}")]
    assert decrypt_with(vault.keyring(vault.key_b), moved) == PLAINTEXT

    # Back: the source side's --vault-url and --vault-token-file.
    ok(
        no_vault_variables(
            "reencrypt",
            tmp_path / "vault",
            "-o",
            tmp_path / "back",
            *CONTEXT,
            "--vault-key",
            vault.key_b,
            "--vault-url",
            vault.server.url,
            "--vault-token-file",
            token,
            "--to-kms-key",
            kms_key_2.arn,
            *kms,
        )
    )
    back = (tmp_path / "back").read_bytes()
    assert edks(back) == [("aws-kms", kms_key_2.arn)]
    assert decrypt_with(moto_kms_keyring(moto_kms, kms_key_2.arn), back) == PLAINTEXT


def test_reencrypt_to_the_same_vault_key_after_rotation_moves_to_the_latest_version(
    vault: Vault, tmp_path: Path
) -> None:
    """The rotation chore: after the server rotates a key, reencrypt with the same key on
    both sides rewraps under the latest version (inspect shows it, to find the messages
    left before raising min_decryption_version). The new key's server, mount and token
    default to the source side's flags; no Vault variable is set."""
    key = vault.server.create_key()
    blob = ok(vault.cli("encrypt", "-", "-o", "-", "--vault-key", key, *CONTEXT, stdin=PLAINTEXT))
    (tmp_path / "v1").write_bytes(blob.stdout)
    assert vault.server.rotate(key) == 2
    token = token_file(tmp_path, vault.server.root_token)
    source = ("--vault-url", vault.server.url, "--vault-mount", "transit")
    ok(
        vault_env(vault.cli)(
            "reencrypt",
            tmp_path / "v1",
            "-o",
            tmp_path / "v2",
            *CONTEXT,
            "--vault-key",
            key,
            *source,
            "--vault-token-file",
            token,
            "--to-vault-key",
            key,
        )
    )
    shown = json.loads(ok(vault.cli("inspect", tmp_path / "v2")).stdout)
    assert [(e["vault_key"], e["vault_key_version"]) for e in shown["encrypted_data_keys"]] == [
        (key, 2)
    ]
    assert decrypt_with(vault.keyring(key), (tmp_path / "v2").read_bytes()) == PLAINTEXT


# -- failures in the command line's words --------------------------------------------------


def test_a_missing_vault_key_fails_the_check_in_flags_and_no_check_keys_skips_it(
    vault: Vault,
) -> None:
    """A key that does not exist fails the start-up read, and the advice names the
    flags (--vault-mount, --no-check-keys), not the library's parameters; with
    --no-check-keys the same key fails later, at its first use."""
    encrypt = ("encrypt", "-", "-o", "-", "--vault-key", "no-such-key", *CONTEXT)
    (said,) = failed(vault.cli(*encrypt, stdin=b"x"))
    assert "transit/no-such-key" in said
    assert "start-up check" in said
    assert "--vault-mount" in said
    assert "--no-check-keys" in said
    assert "mount=" not in said
    assert "check_keys" not in said

    (unchecked,) = failed(vault.cli(*encrypt, "--no-check-keys", stdin=b"x"))
    assert "start-up check" not in unchecked
    assert "datakey" in unchecked
    assert "transit/no-such-key" in unchecked


def test_no_check_keys_lets_a_token_that_may_not_read_its_key_use_it(vault: Vault) -> None:
    """A policy granting only update on the key's datakey, encrypt and decrypt paths: the
    start-up read is refused (and says which grant is missing); with --no-check-keys the
    same token encrypts and decrypts."""
    key = vault.key_a
    policy = f"policy-{key}"
    vault.server.put_policy(
        policy,
        "".join(
            f'path "transit/{op}/{key}" {{ capabilities = ["update"] }}\n'
            for op in ("datakey/plaintext", "encrypt", "decrypt")
        ),
    )
    narrow = vault_env(
        vault.cli, VAULT_ADDR=vault.server.url, VAULT_TOKEN=vault.server.token([policy])
    )
    encrypt = ("encrypt", "-", "-o", "-", "--vault-key", key, *CONTEXT)
    (said,) = failed(narrow(*encrypt, stdin=PLAINTEXT))
    assert f"transit/keys/{key}" in said
    assert "--no-check-keys" in said

    blob = ok(narrow(*encrypt, "--no-check-keys", stdin=PLAINTEXT)).stdout
    decrypt = ("decrypt", "-", "-o", "-", "--vault-key", key, "--no-check-keys", *CONTEXT)
    assert ok(narrow(*decrypt, stdin=blob)).stdout == PLAINTEXT


def test_a_wrong_token_is_one_line_that_never_shows_the_token(
    vault: Vault, sealed: bytes, tmp_path: Path
) -> None:
    """A token the server does not know, from the environment or from a file: refused
    in one line that names the key and says to check the token and where it came from,
    without showing it. Checked at start-up by default (a 403 on reading the key), at
    the decrypt itself with --no-check-keys."""
    wrong = "s.this-token-is-wrong-and-secret"
    by_env = vault_env(vault.cli, VAULT_ADDR=vault.server.url, VAULT_TOKEN=wrong)
    by_file = vault_env(vault.cli, VAULT_ADDR=vault.server.url)
    decrypt = ("decrypt", "-", "-o", "-", "--vault-key", vault.key_a, *CONTEXT)
    token = ("--vault-token-file", token_file(tmp_path, wrong))
    checked = by_env(*decrypt, stdin=sealed)
    unchecked = by_file(*decrypt, *token, "--no-check-keys", stdin=sealed)
    for result in (checked, unchecked):
        (said,) = failed(result)
        assert f"transit/{vault.key_a}" in said
        assert "the token is not valid" in said or "the token must be valid" in said
        assert "VAULT_TOKEN or --vault-token-file" in said
        assert wrong not in result.stderr.decode()
        assert result.stdout == b""
    assert "start-up check" in failed(checked)[0]
    assert "HTTP 403" in failed(unchecked)[0]


@pytest.mark.parametrize(
    "case",
    ["no-address", "no-token", "url-without-key", "target-url-without-target-key"],
)
def test_vault_options_that_cannot_work_are_usage_errors(vault: Vault, case: str) -> None:
    """Without a server or a token, or with Vault options and no Vault key on their
    side, the command stops before touching anything: exit status 2, in flags."""
    key = ("--vault-key", vault.key_a)
    cli, args, expected = {
        "no-address": (
            vault_env(vault.cli, VAULT_TOKEN="t"),
            ("encrypt", *key),
            "--vault-key needs the Vault server's address: give --vault-url URL or set "
            "VAULT_ADDR (or BAO_ADDR)",
        ),
        "no-token": (
            vault_env(vault.cli, VAULT_ADDR=vault.server.url),
            ("decrypt", *key),
            "--vault-key needs a Vault token: set VAULT_TOKEN (or BAO_TOKEN), or give "
            "--vault-token-file FILE",
        ),
        "url-without-key": (
            vault.cli,
            ("encrypt", "--raw-key-file", "k.json", "--vault-url", vault.server.url),
            "--vault-url is for a Vault key: give --vault-key NAME",
        ),
        "target-url-without-target-key": (
            vault.cli,
            ("reencrypt", *key, "--to-vault-url", vault.server.url, "--to-raw-key-file", "k"),
            "--to-vault-url is for a Vault key: give --to-vault-key NAME",
        ),
    }[case]
    result = cli(*args, "-", "-o", "-", stdin=b"x")
    assert result.returncode == 2, result.stderr.decode()
    assert result.stderr.decode().splitlines()[-1].endswith(f": error: {expected}")


def test_a_token_file_that_holds_no_token_is_refused_without_showing_it(
    vault: Vault, tmp_path: Path
) -> None:
    """An empty file, or one with more than one word in it (a file named by mistake),
    is one line naming the flag and the file; nothing of its content is shown."""
    cli = vault_env(vault.cli, VAULT_ADDR=vault.server.url)
    empty, notes = tmp_path / "empty", tmp_path / "notes"
    empty.write_text("\n")
    notes.write_text("secret-part-one secret-part-two\n")
    encrypt = ("encrypt", "-", "-o", "-", "--vault-key", vault.key_a)
    for path, expected in ((empty, "the file is empty"), (notes, "does not hold one Vault token")):
        result = cli(*encrypt, "--vault-token-file", path, stdin=b"x")
        (said,) = failed(result)
        assert said.startswith(f"aioenvelope: error: --vault-token-file {path}: {expected}")
        assert b"secret-part" not in result.stderr


# -- inspect -------------------------------------------------------------------------------


def test_inspect_shows_a_vault_edks_mount_key_and_key_version(vault: Vault, sealed: bytes) -> None:
    """No key needed: the EDK's provider info as text, split into mount and key, and the
    key version it was wrapped under (to find messages below a min_decryption_version)."""
    shown = json.loads(ok(vault.cli("inspect", "-", stdin=sealed)).stdout)
    (edk,) = shown["encrypted_data_keys"]
    assert edk["provider_id"] == "vault-transit"
    assert edk["provider_info"] == f"transit/{vault.key_a}"
    assert (edk["vault_mount"], edk["vault_key"], edk["vault_key_version"]) == (
        "transit",
        vault.key_a,
        1,
    )
    assert "provider_info_base64" not in edk
    assert os.fsencode(vault.key_a) in sealed  # the name is in the header, the address not
    assert vault.server.url.encode() not in sealed
