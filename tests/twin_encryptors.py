"""Twin encryptors: the same data key, message ID, EDKs, context (and signing key), so
two of them write the same message, up to the ECDSA signature, whichever way each is
driven (one-shot ``encrypt_all``, chunk by chunk, or through ``EncryptingStream``).

The EDK is a dummy no keyring can unwrap, so :meth:`Twins.read` decrypts with the data
key directly, through the sans-I/O reader.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from cryptography.hazmat.primitives.asymmetric import ec
from messages import build_encryptor

from aioenvelope import AlgorithmSuite, EncryptingStream, StreamSource
from aioenvelope.format import MessageDecryptor, MessageEncryptor
from aioenvelope.format.encryption_context import PUBLIC_KEY_FIELD
from aioenvelope.format.signing import Signer, Verifier


class Twins:
    """Makes encryptors that all write the same message (see the module docstring)."""

    def __init__(
        self, suite: AlgorithmSuite, frame_length: int, context: Mapping[str, str]
    ) -> None:
        self.suite = suite
        self.frame_length = frame_length
        self.context = dict(context)
        self.data_key = os.urandom(suite.key_length)
        self.message_id = os.urandom(32)
        self.signing_key = ec.generate_private_key(ec.SECP384R1()) if suite.signing else None

    def make(self) -> MessageEncryptor:
        signer = Signer(self.suite, self.signing_key) if self.signing_key is not None else None
        return build_encryptor(
            self.suite,
            data_key=self.data_key,
            message_id=self.message_id,
            context=self.context,
            frame_length=self.frame_length,
            signer=signer,
        )

    def stream(self, source: StreamSource) -> EncryptingStream:
        """An :class:`EncryptingStream` over ``source`` that writes this twin's message."""

        async def start() -> MessageEncryptor:
            return self.make()

        return EncryptingStream(source, start, plaintext_length=None)

    def begin(self, decryptor: MessageDecryptor) -> None:
        """Check the header read is the twins' (suite, message ID, frame length and
        context), then start the body with their data key."""
        parsed = decryptor.read_header()
        assert parsed is not None
        header = parsed.header
        assert header.algorithm_suite is self.suite
        assert (header.message_id, header.frame_length) == (self.message_id, self.frame_length)
        stored = dict(header.encryption_context)
        assert (PUBLIC_KEY_FIELD in stored) == self.suite.signing
        stored.pop(PUBLIC_KEY_FIELD, None)
        assert stored == self.context
        verifier = None
        if self.suite.signing:
            verifier = Verifier(self.suite, parsed.header.encryption_context[PUBLIC_KEY_FIELD])
        decryptor.begin_body(self.data_key, verifier=verifier)

    def read(self, message: bytes) -> bytes:
        """Decrypt ``message`` whole with the sans-I/O reader."""
        decryptor = MessageDecryptor(max_encrypted_data_keys=10)
        decryptor.receive_data(message)
        decryptor.receive_eof()
        self.begin(decryptor)
        return decryptor.read_all()
