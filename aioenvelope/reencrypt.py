"""Re-encryption: a message decrypted and encrypted again under other keys.

Key rotation for this format is re-encryption, never a new header on the old body. A
v2 header's tag is sealed under the message key with a fixed all-zero IV; a header with
other encrypted data keys would need a second tag under the same (key, IV), and two GCM
tags under one (key, IV) give away the GHASH key, with which anyone can forge frames of
both messages. So the new message gets a new message ID (a new derived key), usually a
new data key, and every frame is sealed afresh.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing

from .errors import ConfigurationError
from .format.encryptor import MessageEncryptor
from .format.header import MessageHeader
from .stats import StatsRecorder
from .streams import DecryptingStream, EncryptingStream, _Stream

__all__ = ["ReencryptingStream"]


class ReencryptingStream(_Stream):
    """A message decrypted and encrypted again under other keys, chunk by chunk.

    The plaintext passes through one step at a time (constant memory). The new message
    ends (its final frame) only after the old one verified to its end, signature
    included: if the old message is damaged or truncated, iteration raises before the
    new message is complete, so nothing that reads it whole can take it for whole.
    """

    def __init__(
        self,
        plaintext: DecryptingStream,
        start: Callable[[MessageHeader], Awaitable[MessageEncryptor]],
        *,
        length_bound: int | None = None,
        stats: StatsRecorder | None = None,
    ) -> None:
        """``length_bound``: what the data-key cache was charged for the new message
        (the input's size); more plaintext than that is refused, so a key's byte limit
        holds even for an input that grew after it was measured."""
        self._source = plaintext
        self._plaintext = plaintext
        self._start = start
        self._bound = length_bound
        self._stats = stats  # the new message's bytes and completion (the old one counts its own)
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

            bound = self._bound

            async def chunks() -> AsyncGenerator[bytes, None]:
                if first is not None:
                    yield first
                async for chunk in iterator:
                    yield chunk

            async def rest() -> AsyncGenerator[bytes, None]:
                total = 0
                async with aclosing(chunks()) as all_chunks:
                    async for chunk in all_chunks:
                        total += len(chunk)
                        if bound is not None and total > bound:
                            raise ConfigurationError(
                                f"the message holds more than the {bound} bytes its "
                                "input measured when it was opened (did the file grow?); "
                                "re-encrypt it again once it is complete"
                            )
                        yield chunk

            async with EncryptingStream(
                rest(), ready, plaintext_length=None, stats=self._stats
            ) as out:
                async for chunk in out:
                    self.header = out.header
                    yield chunk
        finally:
            await plaintext.aclose()
