"""Rewrap: a message's data key wrapped under another keyring, body untouched.

The async half of :mod:`aioenvelope.format.rewrap`: it gets the data key (one KMS call
or a cache hit), has the new keyring wrap it, and streams the body through unchanged.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable

from .errors import KeyringError, MessageLimitError, TruncatedMessageError
from .format._cursor import NeedMoreData
from .format.encryptor import MessageEncryptor
from .format.header import EncryptedDataKey, MessageHeader, ParsedHeader, parse_header
from .format.header_auth import authenticated_message_key
from .format.rewrap import check_rewrappable, reauthenticated_header
from .keyrings.base import EncryptionMaterials, Keyring
from .materials import DecryptionPlan
from .streams import (
    STEP,
    DecryptingStream,
    EncryptingStream,
    StreamSource,
    _close_source,
    _pieces,
    _Stream,
)

__all__ = ["ReencryptingStream", "RewrappingStream", "new_header", "wrap_again"]


async def wrap_again(
    plan: DecryptionPlan, header: MessageHeader, to_keyring: Keyring, max_encrypted_data_keys: int
) -> tuple[EncryptedDataKey, ...]:
    """The data key of ``plan`` wrapped by ``to_keyring`` alone, under the same context."""
    materials = EncryptionMaterials(
        algorithm_suite=header.algorithm_suite,
        encryption_context=plan.materials.encryption_context,
        plaintext_data_key=plan.data_key,
        required_encryption_context_keys=plan.materials.required_encryption_context_keys,
    )
    result = await to_keyring.on_encrypt(materials)
    if result.plaintext_data_key != plan.data_key or not result.encrypted_data_keys:
        raise KeyringError(f"{to_keyring!r} did not wrap the existing data key")
    if len(result.encrypted_data_keys) > max_encrypted_data_keys:
        raise MessageLimitError(
            f"{to_keyring!r} produced {len(result.encrypted_data_keys)} encrypted data keys, "
            f"more than max_encrypted_data_keys={max_encrypted_data_keys}"
        )
    return result.encrypted_data_keys


async def new_header(
    parsed: ParsedHeader,
    plan: Callable[[MessageHeader], Awaitable[DecryptionPlan]],
    rewrapped: Callable[[MessageHeader, DecryptionPlan], Awaitable[tuple[EncryptedDataKey, ...]]],
) -> tuple[bytes, MessageHeader]:
    """The rewrapped header for ``parsed`` (bytes and value): unwrap, check the old
    header, wrap again (``rewrapped``), re-authenticate."""
    check_rewrappable(parsed)
    decryption = await plan(parsed.header)
    # Check the old header before the new keyring does any work (a KMS Encrypt, say):
    # a forged header must cost nothing but the Decrypt that exposed it.
    aead, required = authenticated_message_key(
        parsed, decryption.data_key, decryption.required_context
    )
    edks = await rewrapped(parsed.header, decryption)
    return reauthenticated_header(parsed, aead, required, edks)


class RewrappingStream(_Stream):
    """The rewrapped message, chunk by chunk: a new header, then the body as it came.

    The body is passed through unverified, as it is not changed: reading the new message
    verifies it exactly as it would have verified the old one.
    """

    def __init__(
        self,
        source: StreamSource,
        header: Callable[[ParsedHeader], Awaitable[tuple[bytes, MessageHeader]]],
        *,
        max_encrypted_data_keys: int,
    ) -> None:
        self._source = source
        self._header = header
        self._max_edks = max_encrypted_data_keys
        super().__init__()

    async def _run(self) -> AsyncGenerator[bytes, None]:
        self._started = True
        pieces = _pieces(self._source, STEP)
        try:
            buffer = bytearray()
            parsed: ParsedHeader | None = None
            async for piece in pieces:
                buffer += piece
                try:
                    parsed = parse_header(buffer, max_encrypted_data_keys=self._max_edks)
                    break
                except NeedMoreData:
                    continue
            if parsed is None:
                raise TruncatedMessageError(
                    "the message is truncated: it ends inside the message header. Check "
                    "that the whole ciphertext was stored and read back"
                )
            header_bytes, self.header = await self._header(parsed)
            yield header_bytes
            rest = bytes(buffer[parsed.length :])
            del buffer
            if rest:
                yield rest
            async for piece in pieces:
                yield bytes(piece)
        finally:
            await pieces.aclose()
            await _close_source(self._source)


class ReencryptingStream(_Stream):
    """A message decrypted and encrypted again under other keys, chunk by chunk.

    For signed messages, which cannot be rewrapped. The plaintext passes through one
    step at a time; the new message gets a new data key and message ID.
    """

    def __init__(
        self,
        plaintext: DecryptingStream,
        start: Callable[[MessageHeader], Awaitable[MessageEncryptor]],
    ) -> None:
        self._source = plaintext
        self._plaintext = plaintext
        self._start = start
        super().__init__()

    async def _run(self) -> AsyncGenerator[bytes, None]:
        self._started = True
        plaintext = self._plaintext
        try:
            iterator = aiter(plaintext)
            try:
                first: bytes | None = await anext(iterator)
            except StopAsyncIteration:
                first = None
            old = plaintext.header
            assert old is not None  # known before the first chunk, even an empty one
            encryptor = await self._start(old)

            async def ready() -> MessageEncryptor:
                return encryptor

            async def rest() -> AsyncGenerator[bytes, None]:
                if first is not None:
                    yield first
                async for chunk in iterator:
                    yield chunk

            async with EncryptingStream(rest(), ready, plaintext_length=None) as out:
                async for chunk in out:
                    self.header = out.header
                    yield chunk
        finally:
            await plaintext.aclose()
