"""Sans-I/O core: bytes in, headers/frames/plaintext out. No ``await``, no network, no clock.

Everything byte-exact about the AWS Encryption SDK message format lives here, so it can
be tested without a server and reused by the one-shot, streaming and re-encryption paths.
"""

from .decryptor import END_OF_MESSAGE, MessageDecryptor
from .encryptor import MessageEncryptor
from .header import ContentType, EncryptedDataKey, MessageHeader, ParsedHeader, parse_header
from .suites import AlgorithmSuite, CommitmentPolicy

__all__ = [
    "END_OF_MESSAGE",
    "AlgorithmSuite",
    "CommitmentPolicy",
    "ContentType",
    "EncryptedDataKey",
    "MessageDecryptor",
    "MessageEncryptor",
    "MessageHeader",
    "ParsedHeader",
    "parse_header",
]
