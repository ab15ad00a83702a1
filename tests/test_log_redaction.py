"""No data key in any log record, even with everything at DEBUG.

botocore logs KMS request and response bodies at DEBUG, and those carry ``Plaintext``
(the data key, base64). While a KMS keyring is open its filter rewrites those records;
it is shared between keyrings and gone once the last one closes. Real moto KMS, real
botocore logging, every record captured at the root.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from kms_server import KmsKey, MotoKms
from moto_keyrings import shared_session

from aioenvelope import EnvelopeClient, KmsKeyring, RawAesKeyring
from aioenvelope.format.header import parse_header

CONTEXT = {"tenant": "t1", "purpose": "log-redaction-tests"}
PLAINTEXT = b"attack at dawn " * 7
SECRET_B64 = base64.b64encode(b"a data key of thirty-two bytes!!").decode()
# What a record shows in place of a key, or of a whole record it cannot take apart.
REDACTED = "[redacted by aioenvelope]"
WITHHELD = (
    "[botocore log record withheld by aioenvelope: it names a Plaintext field whose value "
    "could not be isolated, and may carry key material]"
)


class Capture(logging.Handler):
    """Every record that reaches the root logger, as its handlers would see it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def texts(self) -> list[str]:
        return [r.getMessage() for r in self.records]

    def texts_of(self, logger: str) -> list[str]:
        return [r.getMessage() for r in self.records if r.name == logger]


@pytest.fixture
def capture() -> Iterator[Capture]:
    root = logging.getLogger()
    handler, level = Capture(), root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def keyring(moto_kms: MotoKms, *keys: str) -> KmsKeyring:
    return KmsKeyring(
        keys[0],
        additional_key_ids=keys[1:],
        endpoint_url=moto_kms.endpoint_url,
        session=shared_session(),
        check_keys=False,
    )


def forms_of(key: bytes) -> list[str]:
    """The ways a data key could show up in a log line."""
    return [
        base64.b64encode(key).decode(),
        base64.urlsafe_b64encode(key).decode(),
        key.hex(),
        repr(key)[2:-1],
        key.decode("latin-1"),
    ]


def data_key_of(moto_kms: MotoKms, blob: bytes) -> bytes:
    """The message's data key, from KMS directly (boto3, with no keyring of ours open, so
    botocore logs the response body as it is)."""
    edk = parse_header(blob, max_encrypted_data_keys=10).header.encrypted_data_keys[0]
    admin = boto3.client("kms", region_name=moto_kms.region, endpoint_url=moto_kms.endpoint_url)
    response: dict[str, Any] = admin.decrypt(
        CiphertextBlob=edk.ciphertext, EncryptionContext=CONTEXT
    )
    return bytes(response["Plaintext"])


async def test_no_data_key_in_any_debug_record_of_generate_encrypt_and_decrypt(
    moto_kms: MotoKms, kms_key: KmsKey, kms_key_2: KmsKey, capture: Capture
) -> None:
    """GenerateDataKey (key in the response), Encrypt under a second key (key in the
    request) and Decrypt (key in the response), all at DEBUG: botocore logged the bodies,
    and none of the records carries the data key in any form."""
    async with EnvelopeClient(keyring(moto_kms, kms_key.arn, kms_key_2.arn), cache=None) as c:
        blob = await c.encrypt(PLAINTEXT, encryption_context=CONTEXT)
    async with EnvelopeClient(keyring(moto_kms, kms_key.arn), cache=None) as c:
        assert await c.decrypt(blob, encryption_context=CONTEXT) == PLAINTEXT
    texts = capture.texts()
    capture.records.clear()
    data_key = data_key_of(moto_kms, blob)
    # The control: with no keyring of ours open, the same capture sees botocore log the
    # admin client's Decrypt response, and the scan finds the data key in it. So the
    # scan looks for the key the message used, in a form a body carries it in.
    unredacted = capture.texts_of("botocore.parsers")
    assert any(form in text for text in unredacted for form in forms_of(data_key))

    bodies = [t for t in texts if t.startswith(("Response body", "Making request"))]
    # GenerateDataKey's and Decrypt's responses and Encrypt's request carry the key.
    assert sum(REDACTED in t for t in bodies) == 3
    assert [t for t in texts if any(form in t for form in forms_of(data_key))] == []


async def test_redaction_lasts_while_any_keyring_is_open_and_ends_with_the_last(
    moto_kms: MotoKms, kms_key: KmsKey, capture: Capture
) -> None:
    """Shared by keyrings: closing one of two leaves the other's calls redacted; once both
    are closed, botocore's loggers are the application's own again."""
    parsers = logging.getLogger("botocore.parsers")
    body = b'{"KeyId": "k", "Plaintext": "%s"}' % SECRET_B64.encode()

    first = EnvelopeClient(keyring(moto_kms, kms_key.arn), cache=None)
    second = EnvelopeClient(keyring(moto_kms, kms_key.arn), cache=None)
    async with second:
        async with first:
            parsers.debug("Response body:\n%s", body)
        capture.records.clear()
        blob = await second.encrypt(PLAINTEXT, encryption_context=CONTEXT)
        texts = capture.texts()
        parsers.debug("Response body:\n%s", body)
        assert SECRET_B64 not in capture.texts()[-1]
    capture.records.clear()
    data_key = data_key_of(moto_kms, blob)
    assert any(REDACTED in t for t in texts)
    assert not any(form in t for t in texts for form in forms_of(data_key))

    parsers.debug("Response body:\n%s", body)
    assert SECRET_B64 in capture.texts()[-1]


async def test_a_keyring_that_is_not_kms_installs_nothing(capture: Capture) -> None:
    """Only KMS keyrings touch botocore's loggers."""
    parsers = logging.getLogger("botocore.parsers")
    async with EnvelopeClient(RawAesKeyring("n", "k", bytes(32))):
        parsers.debug('{"Plaintext": "%s"}', SECRET_B64)
    assert SECRET_B64 in capture.texts()[-1]


@pytest.mark.parametrize(
    "text",
    [
        'Response body:\nb\'{"KeyId":"arn","Plaintext":"SECRET"}\'',
        'Making request with params: {\'body\': b\'{"Plaintext": "SECRET", "KeyId": "k"}\'}',
        "{'Plaintext': b'\\x00SECRET\\'\"x', 'KeyId': 'k'}",
        '{"PrivateKeyPlaintext": "SECRET"}',
        '"{\\"Plaintext\\": \\"SECRET\\"}"',
        "Plaintext=SECRET",
    ],
    ids=["json-bytes", "request-dict", "python-bytes", "key-pair", "escaped-json", "bare"],
)
async def test_every_form_of_a_plaintext_field_is_redacted_or_withheld(
    text: str, moto_kms: MotoKms, kms_key: KmsKey, capture: Capture
) -> None:
    """Whatever way a body is rendered, logged by botocore while a KMS keyring is open, its
    key does not survive; a form the filter cannot take apart is withheld whole rather
    than let through."""
    async with EnvelopeClient(keyring(moto_kms, kms_key.arn), cache=None):
        logging.getLogger("botocore.parsers").debug("%s", text)
    [shown] = capture.texts_of("botocore.parsers")
    assert "SECRET" not in shown
    assert REDACTED in shown or shown == WITHHELD


async def test_records_without_key_material_are_left_alone(
    moto_kms: MotoKms, kms_key: KmsKey, capture: Capture
) -> None:
    text = 'Response body:\nb\'{"CiphertextBlob":"AQID","KeyId":"arn"}\''
    async with EnvelopeClient(keyring(moto_kms, kms_key.arn), cache=None):
        logging.getLogger("botocore.parsers").debug("%s", text)
    assert capture.texts_of("botocore.parsers") == [text]
