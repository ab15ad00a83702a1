"""What the errors say: enough to act on, with the cause kept, and never a key.

A user who sees "could not decrypt" needs to know which keys the message was written
for and which keys they have; one who sees a failed KMS or DynamoDB call needs
botocore's reason (no route to the endpoint, no credentials), not only a class name or
"did not finish"; one who mistyped a key or a path needs to hear what is wrong with it.
Everything through the public API, against the moto server.
"""

from __future__ import annotations

import base64
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aioboto3
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from kms_server import KmsKey, MotoKms
from moto_keyrings import moto_kms_keyring

import aioenvelope
from aioenvelope import (
    BranchKeyStore,
    EncryptedDataKey,
    EncryptionMaterials,
    EnvelopeClient,
    HierarchicalKeyring,
    Keyring,
    MultiKeyring,
    RawAesKeyring,
    RawRsaKeyring,
    errors,
)

PLAINTEXT = b"the quarterly numbers"
CONTEXT = {"purpose": "error-message-tests"}
REFUSING_ENDPOINT = "http://127.0.0.1:1"  # nothing listens on port 1: refused at once
CANNOT_CONNECT = f'Could not connect to the endpoint URL: "{REFUSING_ENDPOINT}/"'
CONNECTION_HINT = "Check endpoint_url, the region and the network"
CREDENTIALS_HINT = (
    "Give AWS credentials the way the AWS CLI takes them: the AWS_ACCESS_KEY_ID and "
    "AWS_SECRET_ACCESS_KEY environment variables, a profile (AWS_PROFILE, "
    "~/.aws/credentials), or an instance or container role"
)


class ForeignServiceKeyring(Keyring):
    """A user's own keyring for a key service this library does not know (a Vault
    transit key, say): it adds an EDK with its own provider ID and info."""

    def __init__(self, provider_id: str, provider_info: bytes) -> None:
        self.provider_id = provider_id
        self.provider_info = provider_info

    async def on_encrypt(self, materials: EncryptionMaterials) -> EncryptionMaterials:
        edk = EncryptedDataKey(self.provider_id, self.provider_info, os.urandom(48))
        return materials.with_encrypted_data_key(edk)


async def encrypt_with(keyring: Keyring, **client_options: Any) -> bytes:
    async with EnvelopeClient(keyring, **client_options) as client:
        return await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)


async def refusal(keyring: Keyring, message: bytes, **client_options: Any) -> str:
    """The text of the ``NoUsableKeyError`` that ``keyring`` raises on ``message``."""
    async with EnvelopeClient(keyring, **client_options) as client:
        with pytest.raises(errors.NoUsableKeyError) as info:
            await client.decrypt(message)
    return str(info.value)


# ---------------------------------------------------------------------------------------
# "could not decrypt": which keys the message carries, which keys the keyring has
# ---------------------------------------------------------------------------------------


async def test_no_usable_key_names_every_key_the_message_carries_and_the_keyring_s_own(
    moto_kms: MotoKms,
    kms_key: KmsKey,
    make_branch_key_store: Callable[..., BranchKeyStore],
    branch_keys: tuple[str, str],
) -> None:
    """A message for a raw AES key, a KMS key, a branch key and a foreign service's key,
    opened with another raw key: the error says what the reader has (namespace/name,
    not a Python repr) and, for each EDK, whose key it is: namespace/name, the KMS key
    ARN, the branch key ID and version, the foreign provider ID and info."""
    branch_key_id = branch_keys[0]
    async with make_branch_key_store() as store:
        version = (await store.get_active_branch_key(branch_key_id)).version
    writer = MultiKeyring(
        generator=RawAesKeyring("billing", "orders-2024", os.urandom(32)),
        children=[
            moto_kms_keyring(moto_kms, kms_key.arn, check_keys=False),
            HierarchicalKeyring(make_branch_key_store(), branch_key_id=branch_key_id),
            ForeignServiceKeyring("vault", b"transit/keys/orders"),
        ],
    )
    message = await encrypt_with(writer)
    reader = RawAesKeyring("billing", "orders-2025", os.urandom(32))

    assert await refusal(reader, message) == (
        "the raw AES keyring billing/orders-2025 could not decrypt any of the message's "
        "4 encrypted data keys (0 named this key): the message was not encrypted for "
        "this key. The message carries encrypted data keys for: "
        "raw AES key billing/orders-2024; "
        f"AWS KMS key {kms_key.arn}; "
        f"branch key {branch_key_id} version {version} (hierarchical keyring); "
        "key vault/transit/keys/orders"
    )


async def test_a_kms_keyring_is_named_by_its_keys_not_by_a_python_repr(
    moto_kms: MotoKms, kms_key: KmsKey, kms_key_2: KmsKey
) -> None:
    """A message under one KMS key, read by a keyring for another: both ARNs in the
    text, the keyring's own as what it has, the message's as what it carries."""
    message = await encrypt_with(moto_kms_keyring(moto_kms, kms_key.arn, check_keys=False))
    reader = moto_kms_keyring(moto_kms, kms_key_2.arn, check_keys=False)

    text = await refusal(reader, message)

    assert text == (
        f"the KMS keyring with key {kms_key_2.arn} could not decrypt any of the message's "
        "1 encrypted data keys (0 tried): no encrypted data key names a usable key. "
        f"The message carries encrypted data keys for: AWS KMS key {kms_key.arn}"
    )
    assert "KmsKeyring(" not in text
    assert reader.kms_calls == {}


async def test_a_multikeyring_names_the_message_s_keys_once_after_each_child_s_reason(
    rsa_private_key: rsa.RSAPrivateKey,
) -> None:
    """Each child says what it has and why it failed; the message's keys come once, at
    the end, not once per child."""
    message = await encrypt_with(RawAesKeyring("ops", "backup", os.urandom(16)))
    reader = MultiKeyring(
        generator=RawAesKeyring("ops", "primary", os.urandom(32)),
        children=[RawRsaKeyring("ops", "escrow", private_key=rsa_private_key)],
    )

    assert await refusal(reader, message) == (
        "no keyring in the MultiKeyring could decrypt the message: "
        "the raw AES keyring ops/primary could not decrypt any of the message's 1 "
        "encrypted data keys (0 named this key): the message was not encrypted for this "
        "key; the raw RSA keyring ops/escrow could not decrypt any of the message's 1 "
        "encrypted data keys (0 named this key): the message was not encrypted for this "
        "key. The message carries encrypted data keys for: raw AES key ops/backup"
    )


async def test_the_list_of_the_message_s_keys_is_capped() -> None:
    """A message may carry up to 65535 EDKs: the text names the first ten and counts
    the rest."""
    writer = MultiKeyring(
        generator=RawAesKeyring("team", "key-00", os.urandom(32)),
        children=[RawAesKeyring("team", f"key-{i:02}", os.urandom(32)) for i in range(1, 12)],
    )
    message = await encrypt_with(writer, max_encrypted_data_keys=12)

    text = await refusal(
        RawAesKeyring("team", "other", os.urandom(32)), message, max_encrypted_data_keys=12
    )

    listed = text.split("The message carries encrypted data keys for: ", 1)[1]
    assert listed == ("; ".join(f"raw AES key team/key-{i:02}" for i in range(10)) + "; and 2 more")


async def test_a_forged_edk_is_named_escaped_and_cut_short_with_no_ciphertext() -> None:
    """The provider ID and info come from whoever wrote the message: control
    characters show escaped (the text stays one line), long values are cut, and neither
    the EDKs' ciphertext nor the reader's key appears in any form."""
    long_info = b"x" * 500
    writer = MultiKeyring(
        generator=RawAesKeyring("ns", "writer", os.urandom(32)),
        children=[
            ForeignServiceKeyring("evil\nprovider", b"line\rbreak"),
            ForeignServiceKeyring("bulky", long_info),
            ForeignServiceKeyring("binary", bytes(range(256))),
        ],
    )
    message = await encrypt_with(writer)
    reader_key = os.urandom(32)

    text = await refusal(RawAesKeyring("ns", "reader", reader_key), message)

    listed = text.split("The message carries encrypted data keys for: ", 1)[1]
    assert listed.split("; ") == [
        "raw AES key ns/writer",
        r"key 'evil\nprovider'/'line\rbreak'",
        "key bulky/" + "x" * 128 + "...",
        "key binary/0x" + bytes(range(64)).hex() + "...",
    ]
    assert "\n" not in text
    assert "\r" not in text
    wrapped = [edk.ciphertext for edk in aioenvelope.inspect(message).encrypted_data_keys]
    for secret in (reader_key, *wrapped):
        for form in (secret.hex(), base64.b64encode(secret).decode()):
            assert form[:16] not in text


# ---------------------------------------------------------------------------------------
# Connection and credential failures keep botocore's reason
# ---------------------------------------------------------------------------------------


async def test_a_refused_connection_is_named_with_botocore_s_message(
    moto_kms: MotoKms, kms_key: KmsKey
) -> None:
    """One attempt, refused: the error says it was a connection error, carries
    botocore's "Could not connect to the endpoint URL" and says what to check, not only
    the class name."""
    keyring = moto_kms_keyring(
        moto_kms, kms_key.arn, endpoint_url=REFUSING_ENDPOINT, check_keys=False, max_attempts=1
    )
    async with EnvelopeClient(keyring) as client:
        with pytest.raises(errors.KMSError) as info:
            await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)

    assert str(info.value) == (
        f"KMS GenerateDataKey with key {kms_key.arn} failed with a connection error "
        f"({CANNOT_CONNECT}). {CONNECTION_HINT}"
    )
    assert (info.value.error_code, info.value.transient) == ("EndpointConnectionError", True)


async def test_a_deadline_spent_retrying_a_refused_connection_says_so(
    moto_kms: MotoKms, kms_key: KmsKey
) -> None:
    """Many attempts allowed, a short deadline: botocore's backoff between refused
    connections uses it up. The timeout says the time went on retries, how many
    attempts failed, and the last one's reason, instead of only "did not finish"."""
    keyring = moto_kms_keyring(
        moto_kms,
        kms_key.arn,
        endpoint_url=REFUSING_ENDPOINT,
        check_keys=False,
        max_attempts=50,  # botocore's backoff alone outlasts the deadline
        deadline=1.0,
    )
    async with EnvelopeClient(keyring) as client:
        with pytest.raises(errors.KMSTimeoutError) as info:
            await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)

    assert re.fullmatch(
        rf"KMS GenerateDataKey with key {re.escape(kms_key.arn)} did not finish within 1 s "
        r"\(retries included\): the time went on retries after [1-9]\d* failed attempts?, "
        rf"the last with a connection error \({re.escape(CANNOT_CONNECT)}\)\. "
        rf"{re.escape(CONNECTION_HINT)}",
        str(info.value),
    ), str(info.value)
    assert (info.value.error_code, info.value.transient) == ("Timeout", True)


async def test_a_branch_key_store_s_dynamodb_call_keeps_the_connection_error(
    make_branch_key_store: Callable[..., BranchKeyStore],
) -> None:
    """DynamoDB calls share the KMS calls' code: a refused connection there is named
    the same way, on the table."""
    store = make_branch_key_store(endpoint_url=REFUSING_ENDPOINT, max_attempts=1)
    async with store:
        with pytest.raises(errors.DynamoDBError) as info:
            await store.get_active_branch_key("tenant-a")

    assert str(info.value) == (
        f"DynamoDB GetItem on table {store.table_name} failed with a connection error "
        f"({CANNOT_CONNECT}). {CONNECTION_HINT}"
    )
    assert (info.value.error_code, info.value.transient) == ("EndpointConnectionError", True)


@pytest.mark.usefixtures("no_credentials")
async def test_missing_credentials_are_named_with_how_to_give_them(
    moto_kms: MotoKms, kms_key: KmsKey
) -> None:
    """botocore's "Unable to locate credentials" is carried, with where credentials
    come from; it is no outage (not transient: retrying later will not help)."""
    keyring = moto_kms_keyring(moto_kms, kms_key.arn, session=aioboto3.Session())
    with pytest.raises(errors.KMSError) as info:
        async with EnvelopeClient(keyring):
            pass  # the start-up DescribeKey is the first call

    assert str(info.value) == (
        f"KMS DescribeKey with key {kms_key.arn} failed: Unable to locate credentials. "
        f"{CREDENTIALS_HINT}"
    )
    assert (info.value.error_code, info.value.transient) == ("NoCredentialsError", False)


@pytest.mark.usefixtures("no_credentials")
async def test_missing_credentials_of_a_branch_key_store_are_named_too(
    make_branch_key_store: Callable[..., BranchKeyStore],
) -> None:
    """The branch key store's DynamoDB client says the same."""
    store = make_branch_key_store(session=aioboto3.Session())
    async with store:
        with pytest.raises(errors.DynamoDBError) as info:
            await store.get_active_branch_key("tenant-a")

    assert str(info.value) == (
        f"DynamoDB GetItem on table {store.table_name} failed: Unable to locate "
        f"credentials. {CREDENTIALS_HINT}"
    )
    assert (info.value.error_code, info.value.transient) == ("NoCredentialsError", False)


# ---------------------------------------------------------------------------------------
# ClientStats reads as plain data
# ---------------------------------------------------------------------------------------


async def test_client_stats_repr_shows_plain_dicts(moto_kms: MotoKms, kms_key: KmsKey) -> None:
    """``print(client.stats)`` in a REPL or a log line: plain dicts, no
    ``mappingproxy(...)``."""
    keyring = moto_kms_keyring(moto_kms, kms_key.arn, check_keys=False)
    async with EnvelopeClient(keyring) as client:
        await client.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        stats = client.stats

    text = repr(stats)
    assert "mappingproxy" not in text
    assert text.startswith(
        "ClientStats(kms_calls={'GenerateDataKey': 1}, dynamodb_calls={}, "
        "encrypt_cache_hits=0, encrypt_cache_misses=1, "
    )
    assert f"breaker_states={dict(stats.breaker_states)!r}" in text


# ---------------------------------------------------------------------------------------
# File helpers: errors name the destination, a directory is refused before any work
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("overwrite", [True, False])
async def test_a_directory_as_destination_is_refused_before_any_kms_call_or_read(
    moto_kms: MotoKms, kms_key: KmsKey, tmp_path: Path, overwrite: bool
) -> None:
    """``overwrite=True`` replaces files, never directories: a directory destination
    fails at once, naming it, before a data key is asked of KMS (encrypt) or the source
    is opened (decrypt and re-encrypt of a source that does not even exist)."""
    source = tmp_path / "report.csv"
    source.write_bytes(PLAINTEXT)
    destination = tmp_path / "out"
    destination.mkdir()
    missing = tmp_path / "no-such-message"
    expected = (
        f"{destination} is a directory: give the path of the file to write "
        "(overwrite=True replaces a file, never a directory)"
    )
    keyring = moto_kms_keyring(moto_kms, kms_key.arn, check_keys=False)
    async with EnvelopeClient(keyring) as client:
        with pytest.raises(errors.ConfigurationError) as encrypting:
            await client.encrypt_file(source, destination, overwrite=overwrite)
        with pytest.raises(errors.ConfigurationError) as decrypting:
            await client.decrypt_file(missing, destination, overwrite=overwrite)
        with pytest.raises(errors.ConfigurationError) as reencrypting:
            await client.reencrypt_file(
                missing, destination, to_keyring=keyring, overwrite=overwrite
            )
    assert [str(e.value) for e in (encrypting, decrypting, reencrypting)] == [expected] * 3
    assert keyring.kms_calls == {}
    assert names_in(destination) == []


def names_in(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


def write_later(fifo: Path, data: bytes, then: Callable[[], None]) -> threading.Thread:
    """A writer that sends ``data`` through the named pipe ``fifo``, runs ``then``, and
    only then closes it: the reader sees the end of its input after ``then`` ran."""

    def run() -> None:
        with fifo.open("wb") as pipe:  # blocks until the reader opens it
            pipe.write(data)
            pipe.flush()
            then()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


async def test_an_error_moving_the_output_into_place_names_the_destination(
    tmp_path: Path,
) -> None:
    """A directory that appears at the destination while the message is being read (the
    source is a pipe whose writer makes it before closing) makes the final rename fail:
    the error names the destination the caller gave, not the hidden file the output was
    written to first; and nothing is left behind."""
    keyring = RawAesKeyring("ns", "key", os.urandom(32))
    message = await encrypt_with(keyring)
    fifo = tmp_path / "incoming"
    os.mkfifo(fifo)
    destination = tmp_path / "plain.txt"
    writer = write_later(fifo, message, destination.mkdir)
    async with EnvelopeClient(keyring) as client:
        with pytest.raises(IsADirectoryError) as info:
            await client.decrypt_file(fifo, destination, overwrite=True)
    writer.join()

    assert str(info.value) == f"[Errno 21] Is a directory: '{destination}'"
    assert info.value.filename == str(destination)
    assert names_in(tmp_path) == ["incoming", "plain.txt"]
    assert names_in(destination) == []


async def test_a_destination_name_too_long_is_reported_with_its_path(tmp_path: Path) -> None:
    """An ``OSError`` of the output names the path the caller gave, not a name relative
    to its directory."""
    source = tmp_path / "report.csv"
    source.write_bytes(PLAINTEXT)
    destination = tmp_path / ("n" * 300)
    async with EnvelopeClient(RawAesKeyring("ns", "key", os.urandom(32))) as client:
        with pytest.raises(OSError, match="File name too long") as info:
            await client.encrypt_file(source, destination)
    assert info.value.filename == str(destination)


# ---------------------------------------------------------------------------------------
# A key of the wrong type is called that
# ---------------------------------------------------------------------------------------


def test_a_str_wrapping_key_is_reported_as_the_wrong_type_without_the_key() -> None:
    """A key read from a file as text, or pasted in base64, is a ``str``: it is a wrong
    type, not a wrong length (32 characters would even have the right one), and the
    error says how to get bytes (the key file loader, or decoding); the text itself
    never appears."""
    key_text = base64.b64encode(os.urandom(32)).decode()
    for text in (key_text, key_text[:32]):
        with pytest.raises(errors.ConfigurationError) as info:
            RawAesKeyring("ns", "key", text)  # type: ignore[arg-type]
        assert str(info.value) == (
            "wrapping_key must be bytes, not str: load a key file (as `aioenvelope keygen` "
            "writes it) with RawAesKeyring.from_key_file(path), or decode a key held as "
            "text first (for example base64.b64decode(text) or bytes.fromhex(text))"
        )
        assert text[:8] not in str(info.value)


def test_a_wrapping_key_of_a_wrong_length_says_its_length() -> None:
    with pytest.raises(errors.ConfigurationError) as info:
        RawAesKeyring("ns", "key", os.urandom(31))
    assert str(info.value) == (
        "wrapping_key must be 16, 24 or 32 bytes (AES-128/192/256), not 31 bytes"
    )


def test_a_pem_given_as_an_rsa_key_says_how_to_load_it(rsa_private_key: rsa.RSAPrivateKey) -> None:
    """The RSA keyring takes key objects: PEM bytes or text get the loader to use, and
    the PEM (a private key) never appears in the error."""
    pem = rsa_private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    for value in (pem, pem.decode()):
        with pytest.raises(errors.ConfigurationError) as info:
            RawRsaKeyring("ns", "key", private_key=value)  # type: ignore[arg-type]
        assert str(info.value) == (
            f"private_key must be a cryptography RSAPrivateKey, not {type(value).__name__}: "
            "load a PEM or DER key first, with cryptography.hazmat.primitives."
            "serialization.load_pem_private_key (or the load_der_ function)"
        )
        assert "BEGIN" not in str(info.value)
