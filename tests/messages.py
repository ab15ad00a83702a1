"""Helpers that build messages through the sans-I/O writer (the seam tests use), and
hypothesis strategies for contexts and plaintexts."""

from __future__ import annotations

import os
from collections.abc import Mapping

from hypothesis import strategies as st

from aioenvelope import EncryptionMaterials, Keyring
from aioenvelope.format import AlgorithmSuite, EncryptedDataKey, MessageEncryptor
from aioenvelope.format.encryption_context import PUBLIC_KEY_FIELD
from aioenvelope.format.signing import Signer

DUMMY_EDK = EncryptedDataKey("test-provider", b"key-1", b"\x01" * 48)


def build_encryptor(
    suite: AlgorithmSuite = AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY,
    *,
    data_key: bytes | None = None,
    message_id: bytes | None = None,
    context: Mapping[str, str] | None = None,
    required: Mapping[str, str] | None = None,
    frame_length: int = 16,
    edks: tuple[EncryptedDataKey, ...] = (DUMMY_EDK,),
    signer: Signer | None = None,
) -> MessageEncryptor:
    """A writer for any suite, v1 included: the client writes only v2, tests need both."""
    context = dict(context or {})
    if suite.signing and signer is None:
        signer = Signer(suite)
    if signer is not None:
        context[PUBLIC_KEY_FIELD] = signer.encoded_public_key
    return MessageEncryptor(
        algorithm_suite=suite,
        data_key=data_key if data_key is not None else os.urandom(suite.key_length),
        message_id=message_id or os.urandom(32 if suite.message_version == 2 else 16),
        encrypted_data_keys=edks,
        encryption_context=context,
        required_encryption_context=required,
        frame_length=frame_length,
        signer=signer,
    )


context_text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12
).filter(lambda s: not s.startswith("aws-crypto-"))
encryption_contexts = st.dictionaries(context_text, context_text, max_size=5)


async def sealed_for(
    keyring: Keyring,
    suite: AlgorithmSuite,
    plaintext: bytes,
    *,
    context: Mapping[str, str] | None = None,
    frame_length: int = 16,
) -> bytes:
    """A framed message of any suite (v1 included) whose data key ``keyring`` wrapped,
    so the keyring can open it: the EDK is made through the public keyring seam
    (``on_encrypt``) over the context the header stores (with the signing key's entry
    for signing suites, which raw AES binds as its AAD)."""
    stored = dict(context or {})
    signer = Signer(suite) if suite.signing else None
    if signer is not None:
        stored[PUBLIC_KEY_FIELD] = signer.encoded_public_key
    materials = EncryptionMaterials(algorithm_suite=suite, encryption_context=stored)
    materials = await keyring.on_encrypt(materials)
    assert materials.plaintext_data_key is not None
    encryptor = build_encryptor(
        suite,
        data_key=materials.plaintext_data_key,
        context=context,
        frame_length=frame_length,
        edks=materials.encrypted_data_keys,
        signer=signer,
    )
    return encryptor.encrypt_all(plaintext)
