"""Raw AES key files from Python: ``RawAesKeyring.from_key_file`` reads what
``aioenvelope keygen`` writes (the format documented in
``aioenvelope.keyrings.key_file``), and every failure names the file, never the key."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
from cli_runner import Cli, clean_env, keygen, ok
from esdk_peer import esdk_decrypt, peer_keys, raw_aes_key

from aioenvelope import EnvelopeClient, RawAesKeyring, errors


@pytest.fixture(scope="module")
def cli() -> Cli:
    return Cli(clean_env(), ())


async def test_a_keygen_file_opens_what_the_cli_wrote_and_the_cli_opens_ours(
    cli: Cli, tmp_path: Path
) -> None:
    written = keygen(cli, tmp_path / "team.key")
    keyring = RawAesKeyring.from_key_file(written.path)
    assert (keyring.key_namespace, keyring.key_name) == (written.namespace, written.name)
    (tmp_path / "report.csv").write_bytes(b"id,amount\n1,42\n")
    ok(
        cli(
            "encrypt",
            tmp_path / "report.csv",
            "-o",
            tmp_path / "by-cli",
            "--raw-key-file",
            written.path,
            "-c",
            "tenant=t1",
        )
    )
    async with EnvelopeClient(RawAesKeyring.from_key_file(str(written.path))) as client:
        assert (
            await client.decrypt(
                (tmp_path / "by-cli").read_bytes(), encryption_context={"tenant": "t1"}
            )
            == b"id,amount\n1,42\n"
        )
        (tmp_path / "by-library").write_bytes(await client.encrypt(b"from python"))
    ok(
        cli(
            "decrypt",
            tmp_path / "by-library",
            "-o",
            tmp_path / "back",
            "--raw-key-file",
            written.path,
        )
    )
    assert (tmp_path / "back").read_bytes() == b"from python"


async def test_a_file_written_by_hand_in_the_documented_format_interoperates(
    tmp_path: Path,
) -> None:
    """The format is public: a key made elsewhere, written as the docs say, works, and
    the ESDK given the same namespace, name and key reads the message."""
    key = os.urandom(32)
    path = tmp_path / "handmade.json"
    path.write_text(
        json.dumps(
            {
                "type": "aioenvelope-raw-aes",
                "namespace": "billing",
                "name": "orders-2026",
                "key": base64.b64encode(key).decode(),
                "comment": "other members are ignored",
            }
        )
    )
    async with EnvelopeClient(RawAesKeyring.from_key_file(path)) as client:
        message = await client.encrypt(b"invoice", encryption_context={"id": "7"})
    plaintext, header = esdk_decrypt(peer_keys(raw_aes_key("billing", "orders-2026", key)), message)
    assert plaintext == b"invoice"
    assert header.encryption_context["id"] == "7"


SECRET = base64.b64encode(b"k" * 32).decode()


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (None, "cannot read raw key file"),
        ("not json", "is not a raw key file (not JSON)"),
        (json.dumps({"type": "other", "key": SECRET}), "expected type 'aioenvelope-raw-aes'"),
        (
            json.dumps(
                {"type": "aioenvelope-raw-aes", "namespace": "n", "name": "", "key": SECRET}
            ),
            "'name' must be a non-empty string",
        ),
        (
            json.dumps({"type": "aioenvelope-raw-aes", "namespace": "n", "name": "k", "key": "**"}),
            "the key is not valid base64",
        ),
        (
            json.dumps(
                {
                    "type": "aioenvelope-raw-aes",
                    "namespace": "n",
                    "name": "k",
                    "key": base64.b64encode(b"k" * 20).decode(),
                }
            ),
            "must be 16, 24 or 32 bytes, not 20",
        ),
    ],
    ids=["missing", "not-json", "wrong-type", "empty-name", "bad-base64", "wrong-length"],
)
def test_a_bad_key_file_is_a_configuration_error_naming_the_file_not_the_key(
    tmp_path: Path, content: str | None, says: str
) -> None:
    path = tmp_path / "bad.key"
    if content is not None:
        path.write_text(content)
    with pytest.raises(errors.ConfigurationError) as info:
        RawAesKeyring.from_key_file(path)
    assert says in str(info.value)
    assert str(path) in str(info.value)
    assert SECRET not in str(info.value)
    assert "kkkk" not in str(info.value)
