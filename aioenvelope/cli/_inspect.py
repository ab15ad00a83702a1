"""``aioenvelope inspect``: a message header as JSON, read from as few bytes as it needs.

Nothing here is authenticated (no key is used): the output is for finding messages, for
example those still wrapped under an old key, never for trusting them.
"""

from __future__ import annotations

import base64
import contextlib
import re
from pathlib import Path
from typing import Any

from ..errors import ConfigurationError, NoUsableKeyError, TruncatedMessageError
from ..format.header import EncryptedDataKey, HeaderReader, MessageHeader
from ..inspection import INSPECT_MAX_EDKS, TRUNCATED_HEADER
from ..keyrings.azure import keyring as azure
from ..keyrings.azure._key_id import parse_key_url
from ..keyrings.gcp import keyring as gcp
from ..keyrings.hierarchy import wrapping
from ..keyrings.vault import keyring as vault
from ._io import input_chunks

__all__ = ["header_json", "read_header"]

_KMS_PROVIDER_ID = "aws-kms"
# A raw AES EDK's provider info: key name, tag length in bits (128), IV length (12), IV.
_RAW_AES_TRAILER = (128).to_bytes(4, "big") + (12).to_bytes(4, "big")
# A Vault transit ciphertext starts "vault:v<key version>:".
_VAULT_VERSION = re.compile(rb"vault:v([1-9][0-9]{0,9}):")
# Provider IDs whose provider info is a key's name (ARN, branch key ID, transit key,
# Cloud KMS resource name, Key Vault key URL): shown as text.
_TEXT_INFO = frozenset(
    {_KMS_PROVIDER_ID, wrapping.PROVIDER_ID, vault.PROVIDER_ID, gcp.PROVIDER_ID, azure.PROVIDER_ID}
)


async def read_header(source: Path | None) -> MessageHeader:
    """The header of the message in ``source`` (None: stdin), reading no further than the
    chunk the header ends in. Each chunk is parsed once (``HeaderReader``), not the
    header so far again per chunk."""
    reader = HeaderReader(max_encrypted_data_keys=INSPECT_MAX_EDKS)
    chunks = input_chunks(source)
    async with contextlib.aclosing(chunks):
        async for chunk in chunks:
            reader.feed(chunk)
            if reader.parsed is not None:
                return reader.parsed.header
    raise TruncatedMessageError(TRUNCATED_HEADER)


def header_json(header: MessageHeader) -> dict[str, Any]:
    suite = header.algorithm_suite
    return {
        "algorithm_suite": {"name": suite.name, "id": f"0x{suite.suite_id:04X}"},
        "message_version": header.version,
        "message_id": header.message_id.hex(),
        "encryption_context": dict(header.encryption_context),
        "encrypted_data_keys": [_edk_json(edk) for edk in header.encrypted_data_keys],
        "content_type": header.content_type.name.lower().replace("_", "-"),
        "frame_length": header.frame_length,
    }


def _edk_json(edk: EncryptedDataKey) -> dict[str, Any]:
    """Provider info as text where it is text (the key ARN for KMS, the branch key ID for
    the hierarchical keyring, with the branch key version the EDK names, to find
    messages still under an old version; a Vault transit key's ``[namespace/]mount/key``,
    split into its mount path and key name, with the key version the EDK was wrapped
    under; a Cloud KMS key's resource name; a Key Vault key's versioned URL, split into
    its vault, key name and version); otherwise hex and base64, plus the key name when it
    has the raw AES layout."""
    info = edk.provider_info
    entry: dict[str, Any] = {"provider_id": edk.provider_id}
    if edk.provider_id in _TEXT_INFO:
        with contextlib.suppress(UnicodeDecodeError):
            entry["provider_info"] = info.decode("utf-8")  # the key ARN, or branch key ID
    if edk.provider_id == wrapping.PROVIDER_ID:
        with contextlib.suppress(NoUsableKeyError):  # too short to name one
            entry["branch_key_version"] = wrapping.branch_key_version_of(edk.ciphertext)
    if edk.provider_id == vault.PROVIDER_ID and "provider_info" in entry:
        entry.update(_vault_key(entry["provider_info"], edk.ciphertext))
    if edk.provider_id == azure.PROVIDER_ID and "provider_info" in entry:
        entry.update(_azure_key(entry["provider_info"]))
    if "provider_info" not in entry:
        entry["provider_info"] = info.hex()
        entry["provider_info_base64"] = base64.b64encode(info).decode("ascii")
        name = _raw_aes_key_name(info)
        if name is not None:
            entry["key_name"] = name
    entry["encrypted_data_key_length"] = len(edk.ciphertext)
    return entry


def _vault_key(info: str, ciphertext: bytes) -> dict[str, Any]:
    """A Vault transit EDK's mount path (after the namespace, if the keyring had one),
    key name, and the key version its ``vault:vN:`` ciphertext names (to find messages
    below a key's ``min_decryption_version`` before raising it)."""
    path, _, name = info.rpartition("/")
    shown: dict[str, Any] = {"vault_mount": path, "vault_key": name} if path and name else {}
    version = _VAULT_VERSION.match(ciphertext)
    if version is not None:
        shown["vault_key_version"] = int(version.group(1))
    return shown


def _azure_key(info: str) -> dict[str, Any]:
    """A Key Vault EDK's vault, key name and key version (parsed as the keyring parses
    its keys: anything else is shown as the text alone)."""
    try:
        key = parse_key_url(info)
    except ConfigurationError:
        return {}
    shown: dict[str, Any] = {"azure_vault": key.vault_url, "azure_key": key.name}
    if key.version is not None:
        shown["azure_key_version"] = key.version
    return shown


def _raw_aes_key_name(info: bytes) -> str | None:
    trailer_at = len(info) - 12 - len(_RAW_AES_TRAILER)
    if trailer_at <= 0 or info[trailer_at : trailer_at + len(_RAW_AES_TRAILER)] != _RAW_AES_TRAILER:
        return None
    try:
        return info[:trailer_at].decode("utf-8")
    except UnicodeDecodeError:
        return None
