"""``EnvelopeClient``: the one door. It owns the keyring's resources for its lifetime."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from functools import partial
from types import MappingProxyType, TracebackType

import anyio
import anyio.lowlevel

from .coalesce import Coalescer
from .config import CacheConfig, CircuitBreakerConfig, RateLimit
from .errors import ConfigurationError
from .format.body import LARGE_FRAME
from .format.decryptor import MessageDecryptor, OneFrameMessage, read_one_frame_message
from .format.encryption_context import PUBLIC_KEY_FIELD
from .format.encryptor import MessageEncryptor
from .format.header import MAX_FRAME_LENGTH, ContentType, MessageHeader
from .format.suites import AlgorithmSuite, CommitmentPolicy
from .key_manager import KeyManager
from .keyrings.base import Keyring
from .materials import (
    DEFAULT_SUITE,
    WRITABLE_SUITES,
    DecryptionPlan,
    DefaultMaterialsManager,
    EncryptionPlan,
    required_pairs,
)
from .reencrypt import ReencryptingStream
from .runtime import Runtime
from .stats import ClientStats, StatsRecorder
from .streams import (
    DecryptingStream,
    EncryptingStream,
    StreamSource,
    check_destination,
    check_source,
    file_chunks,
    flat,
    in_steps,
    save_stream,
)
from .telemetry import MessageWatch, Telemetry, build_observer

__all__ = [
    "DEFAULT_FRAME_LENGTH",
    "DEFAULT_MAX_ENCRYPTED_DATA_KEYS",
    "DecryptResult",
    "EnvelopeClient",
]

DEFAULT_FRAME_LENGTH = 65536
DEFAULT_MAX_ENCRYPTED_DATA_KEYS = 10
# Distinct ``to_keyring`` objects one client opens for re-encryption (each is kept open,
# with its own data-key cache, until the client exits).
MAX_REENCRYPTION_TARGETS = 16
# Above this size the AES work moves to a worker thread (cryptography releases the GIL),
# so one large message never holds the event loop for more than a fraction of a ms.
OFFLOAD_THRESHOLD = 1 << 20

_BytesLike = bytes | bytearray | memoryview
_NO_CONTEXT: Mapping[str, str] = MappingProxyType({})
_NO_KEYS: frozenset[str] = frozenset()


@dataclass(frozen=True)
class DecryptResult:
    """Plaintext together with the header it was read from."""

    plaintext: bytes = field(repr=False)
    header: MessageHeader


def _checked_bytes(value: object, name: str) -> _BytesLike:
    """``value`` if bytes-like, as one flat run of bytes (see :func:`streams.flat`)."""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise ConfigurationError(f"{name} must be bytes-like, not {type(value).__name__}")
    return flat(value)


def _check_keyring(value: object, name: str) -> None:
    if not isinstance(value, Keyring):
        raise ConfigurationError(f"{name} must be a Keyring, not {type(value).__name__}")


def _check_frame_length(frame_length: int) -> None:
    if (
        isinstance(frame_length, bool)
        or not isinstance(frame_length, int)
        or not (1 <= frame_length <= MAX_FRAME_LENGTH)
    ):
        raise ConfigurationError(
            f"frame_length must be an int from 1 to {MAX_FRAME_LENGTH}; got {frame_length!r}"
        )


class EnvelopeClient:
    """Encrypts and decrypts ESDK-format messages with data keys from a keyring.

    Use it as an async context manager and keep it for the life of the application::

        async with EnvelopeClient(keyring) as client:
            blob = await client.encrypt(b"...", encryption_context={"tenant": "t1"})
            data = await client.decrypt(blob, encryption_context={"tenant": "t1"})
    """

    def __init__(
        self,
        keyring: Keyring,
        *,
        commitment_policy: CommitmentPolicy = CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT,
        algorithm_suite: AlgorithmSuite | None = None,
        frame_length: int = DEFAULT_FRAME_LENGTH,
        max_encrypted_data_keys: int = DEFAULT_MAX_ENCRYPTED_DATA_KEYS,
        cache: CacheConfig | None = CacheConfig(),  # noqa: B008 - frozen, so sharing is safe
        decrypt_rate_limit: RateLimit | None = None,
        circuit_breaker: CircuitBreakerConfig | None = CircuitBreakerConfig(),  # noqa: B008
        clock: Callable[[], float] = time.monotonic,
        telemetry: bool | Telemetry = False,
    ) -> None:
        """``cache``, ``decrypt_rate_limit`` and ``circuit_breaker`` configure the key
        manager (``None`` switches one off); ``clock`` drives their timing (tests).
        ``telemetry=True`` (or a :class:`~aioenvelope.Telemetry`) emits OpenTelemetry
        spans and metrics (the ``[otel]`` extra; docs/observability.md)."""
        _check_keyring(keyring, "keyring")
        if not isinstance(commitment_policy, CommitmentPolicy):
            raise ConfigurationError("commitment_policy must be a CommitmentPolicy member")
        if (
            isinstance(max_encrypted_data_keys, bool)
            or not isinstance(max_encrypted_data_keys, int)
            or not 1 <= max_encrypted_data_keys <= 0xFFFF
        ):
            raise ConfigurationError("max_encrypted_data_keys must be an int from 1 to 65535")
        _check_frame_length(frame_length)
        self.keyring = keyring
        self.commitment_policy = commitment_policy
        self.frame_length = frame_length
        self.max_encrypted_data_keys = max_encrypted_data_keys
        for value, kind, name in (
            (cache, CacheConfig, "cache"),
            (decrypt_rate_limit, RateLimit, "decrypt_rate_limit"),
            (circuit_breaker, CircuitBreakerConfig, "circuit_breaker"),
        ):
            if value is not None and not isinstance(value, kind):
                raise ConfigurationError(f"{name} must be a {kind.__name__} or None")
        self._stats = StatsRecorder()
        # None when telemetry is off: opentelemetry is then never imported.
        self._observer = build_observer(telemetry)
        self._coalescer = Coalescer(self._stats)
        # The decrypt rate limit lives in the runtime: keyrings charge it per remote call.
        self._runtime = Runtime(
            clock=clock,
            stats=self._stats,
            breaker_config=circuit_breaker,
            decrypt_rate_limit=decrypt_rate_limit,
            observer=self._observer,
        )
        self._cache_config, self._clock = cache, clock
        self._materials = self._key_manager(keyring)
        self.algorithm_suite = (
            self._materials.choose_suite(algorithm_suite)
            if (commitment_policy is not CommitmentPolicy.FORBID_ENCRYPT_ALLOW_DECRYPT)
            else None
        )
        self._state = "new"
        # Re-encryption targets, opened on first use, each with a key manager of its own
        # (its own data-key cache) on this client's coalescer and stats.
        self._other_keyrings: dict[int, Keyring] = {}
        self._managers: dict[int, KeyManager] = {id(keyring): self._materials}
        self._opening = anyio.Lock()

    def __repr__(self) -> str:
        return (
            f"EnvelopeClient({self.keyring!r}, commitment_policy={self.commitment_policy.name}, "
            f"state={self._state})"
        )

    async def __aenter__(self) -> EnvelopeClient:
        if self._state != "new":
            raise ConfigurationError("an EnvelopeClient can be entered only once")
        # anyio imports its event-loop backend on first use (~40 ms here): pay that now,
        # at start-up, rather than in the middle of the first stream.
        await anyio.lowlevel.checkpoint()
        self.keyring.attach(self._runtime)
        await self.keyring.open()
        self._state = "open"
        if self._observer is not None:
            self._observer.attach(self._stats)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._state = "closed"
        failures: list[Exception] = []
        try:
            await self._coalescer.aclose()  # shared calls nobody awaits any more
            # Every keyring gets its close() even if one fails (each holds a client).
            for keyring in [*self._other_keyrings.values(), self.keyring]:
                try:
                    await keyring.close()
                except Exception as failure:
                    failures.append(failure)
        finally:
            for manager in self._managers.values():
                manager.close()  # zero the cached data keys
            if self._observer is not None:
                self._observer.detach(self._stats)
        if failures:
            raise failures[0]

    @property
    def stats(self) -> ClientStats:
        """A snapshot of the counters: KMS calls, cache hits and misses, coalesced waits,
        rate-limited requests, circuit breaker states and transitions."""
        return self._stats.snapshot()

    def _require_open(self) -> None:
        if self._state != "open":
            raise ConfigurationError(
                "the EnvelopeClient is not open: use `async with EnvelopeClient(...) as client`"
                if self._state == "new"
                else "the EnvelopeClient is closed"
            )

    async def encrypt(
        self,
        plaintext: _BytesLike,
        *,
        encryption_context: Mapping[str, str] | None = None,
        algorithm_suite: AlgorithmSuite | None = None,
        frame_length: int | None = None,
        required_encryption_context_keys: Collection[str] = (),
    ) -> bytes:
        """Encrypt ``plaintext`` into one message.

        ``required_encryption_context_keys`` names context pairs to authenticate but not
        store: the reader must supply them again to ``decrypt``.
        """
        if self._state != "open":
            self._require_open()
        plaintext = _checked_bytes(plaintext, "plaintext")
        length = len(plaintext) if type(plaintext) is bytes else memoryview(plaintext).nbytes
        if frame_length is None:
            frame_length = self.frame_length
        if type(frame_length) is not int or not 1 <= frame_length <= MAX_FRAME_LENGTH:
            _check_frame_length(frame_length)  # raises, saying what is wrong
        observer = self._observer
        watch = observer.message("encrypt", encryption_context) if observer else None
        if watch is not None:
            return await self._encrypt_watched(
                watch,
                plaintext,
                length,
                encryption_context,
                algorithm_suite,
                frame_length,
                required_encryption_context_keys,
            )
        # _new_encryptor and _seal, inlined for small messages: each coroutine frame
        # costs a visible share of a 1 KiB message.
        plan = await self._materials.encryption_plan(
            encryption_context=encryption_context or _NO_CONTEXT,
            algorithm_suite=algorithm_suite or self.algorithm_suite,
            required_encryption_context_keys=frozenset(required_encryption_context_keys)
            if required_encryption_context_keys
            else _NO_KEYS,
            plaintext_length=length,
        )
        encryptor = self._encryptor_for(plan, frame_length)
        if length >= OFFLOAD_THRESHOLD:
            return await self._seal(encryptor, plaintext)
        message = encryptor.encrypt_all(plaintext)
        stats = self._stats
        stats.messages_encrypted += 1
        stats.bytes_encrypted += length
        return message

    async def _encrypt_watched(
        self,
        watch: MessageWatch,
        plaintext: _BytesLike,
        length: int,
        encryption_context: Mapping[str, str] | None,
        algorithm_suite: AlgorithmSuite | None,
        frame_length: int,
        required_encryption_context_keys: Collection[str],
    ) -> bytes:
        """:meth:`encrypt` inside a telemetry span (its key-service call a child)."""
        encryptor: MessageEncryptor | None = None
        try:
            with watch.current():
                encryptor = await self._new_encryptor(
                    encryption_context,
                    algorithm_suite,
                    frame_length,
                    required_encryption_context_keys,
                    length,
                )
                message = await self._seal(encryptor, plaintext)
        except BaseException as exc:
            watch.finish(
                suite_id=encryptor.header_value.algorithm_suite.suite_id if encryptor else None,
                frames=encryptor.frames if encryptor else 0,
                plaintext_bytes=0,
                error=exc,
            )
            raise
        watch.finish(
            suite_id=encryptor.header_value.algorithm_suite.suite_id,
            frames=encryptor.frames,
            plaintext_bytes=length,
            error=None,
        )
        return message

    async def _seal(self, encryptor: MessageEncryptor, plaintext: _BytesLike) -> bytes:
        """The whole message: in one call for small plaintexts; for large ones a step at
        a time (:func:`~.streams.in_steps`: the loop breathes between steps, and slow
        machines seal in a worker thread), straight into the message's own buffer; with
        frames of 256 KiB or more, through the streaming engine, which seals those piece
        by piece."""
        length = memoryview(plaintext).nbytes
        if length < OFFLOAD_THRESHOLD or encryptor.header_value.frame_length < LARGE_FRAME:
            if length < OFFLOAD_THRESHOLD:
                message = encryptor.encrypt_all(plaintext)
            else:
                # Sealed in place into the message's own buffer, a step at a time.
                whole = encryptor.encrypt_in_steps(plaintext)
                await in_steps(whole.advance)
                message = whole.message()
            stats = self._stats
            stats.messages_encrypted += 1
            stats.bytes_encrypted += length
            return message

        async def ready() -> MessageEncryptor:
            return encryptor

        stream = EncryptingStream(plaintext, ready, plaintext_length=length, stats=self._stats)
        return await stream.read_all()

    def encrypt_stream(
        self,
        source: StreamSource,
        *,
        encryption_context: Mapping[str, str] | None = None,
        algorithm_suite: AlgorithmSuite | None = None,
        frame_length: int | None = None,
        required_encryption_context_keys: Collection[str] = (),
        plaintext_length: int | None = None,
    ) -> EncryptingStream:
        """Encrypt ``source`` into one message, returned as an async iterator of ``bytes``.

        Memory stays near one frame plus one 1 MiB step whatever the source's chunking;
        the source is read only as fast as the result is consumed. At most one KMS call
        is made, before the first chunk. ``plaintext_length``, when the caller knows it,
        lets the stream reuse a cached data key (without it every stream gets a fresh
        key); a stream of any other length then fails. Use ``async with`` (or
        ``aclose()``) to close the source when stopping early.
        """
        self._require_open()
        check_source(source)
        frame_length = self._frame_length_or_default(frame_length)
        if plaintext_length is not None and (
            isinstance(plaintext_length, bool)
            or not isinstance(plaintext_length, int)
            or plaintext_length < 0
        ):
            raise ConfigurationError("plaintext_length must be a non-negative int or None")

        def start() -> Awaitable[MessageEncryptor]:
            return self._new_encryptor(
                encryption_context,
                algorithm_suite,
                frame_length,
                required_encryption_context_keys,
                plaintext_length,
            )

        return EncryptingStream(
            source,
            start,
            plaintext_length=plaintext_length,
            stats=self._stats,
            watch=self._stream_watch("encrypt", encryption_context),
        )

    def _stream_watch(
        self, operation: str, context: Mapping[str, str] | None
    ) -> Callable[[], MessageWatch | None] | None:
        """What a stream calls at its first chunk for its telemetry span (None: off)."""
        observer = self._observer
        if observer is None:
            return None
        return lambda: observer.stream(operation, context)

    async def encrypt_file(
        self,
        source: str | os.PathLike[str],
        destination: str | os.PathLike[str],
        *,
        encryption_context: Mapping[str, str] | None = None,
        algorithm_suite: AlgorithmSuite | None = None,
        frame_length: int | None = None,
        required_encryption_context_keys: Collection[str] = (),
        overwrite: bool = False,
    ) -> MessageHeader:
        """Stream the file ``source`` into an encrypted ``destination``.

        The output is written to a temporary file (mode 0600) and moved into place only
        when complete; an existing ``destination`` is kept unless ``overwrite``.
        """
        await check_destination(destination)
        size = (await anyio.Path(source).stat()).st_size
        stream = self.encrypt_stream(
            file_chunks(source),
            encryption_context=encryption_context,
            algorithm_suite=algorithm_suite,
            frame_length=frame_length,
            required_encryption_context_keys=required_encryption_context_keys,
            plaintext_length=size,
        )
        return await save_stream(stream, destination, overwrite=overwrite)

    def _frame_length_or_default(self, frame_length: int | None) -> int:
        frame_length = self.frame_length if frame_length is None else frame_length
        _check_frame_length(frame_length)
        return frame_length

    async def _new_encryptor(
        self,
        encryption_context: Mapping[str, str] | None,
        algorithm_suite: AlgorithmSuite | None,
        frame_length: int,
        required_encryption_context_keys: Collection[str],
        plaintext_length: int | None,
    ) -> MessageEncryptor:
        plan = await self._materials.encryption_plan(
            encryption_context=encryption_context or _NO_CONTEXT,
            algorithm_suite=algorithm_suite or self.algorithm_suite,
            required_encryption_context_keys=frozenset(required_encryption_context_keys)
            if required_encryption_context_keys
            else _NO_KEYS,
            plaintext_length=plaintext_length,
        )
        return self._encryptor_for(plan, frame_length)

    @staticmethod
    def _encryptor_for(plan: EncryptionPlan, frame_length: int) -> MessageEncryptor:
        assert plan.materials.plaintext_data_key is not None
        return MessageEncryptor(
            algorithm_suite=plan.materials.algorithm_suite,
            data_key=plan.materials.plaintext_data_key,
            message_id=os.urandom(32),
            encrypted_data_keys=plan.materials.encrypted_data_keys,
            encryption_context=plan.stored_context,
            required_encryption_context=plan.required_context,
            frame_length=frame_length,
            signer=plan.signer,
            serialized_encryption_context=plan.serialized_stored_context,
        )

    async def decrypt(
        self, ciphertext: _BytesLike, *, encryption_context: Mapping[str, str] | None = None
    ) -> bytes:
        """Decrypt one whole message; every pair in ``encryption_context`` must match it."""
        if (
            type(ciphertext) is bytes
            and self._state == "open"
            and len(ciphertext) < OFFLOAD_THRESHOLD
        ):
            # decrypt_with_header's checks hold (open, bytes): ask for a span as it does.
            # With none (no telemetry, or telemetry that traces no such message), the small
            # one-frame message goes without its coroutines and result object.
            observer = self._observer
            watch = observer.message("decrypt", encryption_context) if observer else None
            if watch is not None:
                return (
                    await self._decrypt_watched(watch, ciphertext, encryption_context)
                ).plaintext
            message = read_one_frame_message(
                ciphertext, max_encrypted_data_keys=self.max_encrypted_data_keys
            )
            if message is None:
                return (await self._open_message(ciphertext, encryption_context))[0].plaintext
            # _open_one_frame's steps, one coroutine fewer on the hot path.
            materials, _ = await self._materials.decryption_materials(
                message.header, encryption_context, serialized_edks=message.edks
            )
            assert materials.plaintext_data_key is not None
            plaintext = message.open(
                materials.plaintext_data_key,
                required_pairs(materials)
                if materials.required_encryption_context_keys
                else _NO_CONTEXT,
            )
            stats = self._stats
            stats.messages_decrypted += 1
            stats.bytes_decrypted += len(plaintext)
            return plaintext
        result = await self.decrypt_with_header(ciphertext, encryption_context=encryption_context)
        return result.plaintext

    async def decrypt_with_header(
        self, ciphertext: _BytesLike, *, encryption_context: Mapping[str, str] | None = None
    ) -> DecryptResult:
        """Like :meth:`decrypt`, and also return the parsed header."""
        self._require_open()
        ciphertext = _checked_bytes(ciphertext, "ciphertext")
        observer = self._observer
        watch = observer.message("decrypt", encryption_context) if observer else None
        if watch is None:
            return (await self._open_message(ciphertext, encryption_context))[0]
        return await self._decrypt_watched(watch, ciphertext, encryption_context)

    async def _decrypt_watched(
        self,
        watch: MessageWatch,
        ciphertext: _BytesLike,
        encryption_context: Mapping[str, str] | None,
    ) -> DecryptResult:
        """:meth:`decrypt_with_header` inside a telemetry span."""
        try:
            with watch.current():
                result, frames = await self._open_message(ciphertext, encryption_context)
        except BaseException as exc:
            watch.finish(suite_id=None, frames=0, plaintext_bytes=0, error=exc)
            raise
        header = result.header
        watch.finish(
            suite_id=header.algorithm_suite.suite_id,
            frames=frames,
            plaintext_bytes=len(result.plaintext),
            error=None,
            context=header.encryption_context,
        )
        return result

    async def _open_message(
        self, ciphertext: _BytesLike, encryption_context: Mapping[str, str] | None
    ) -> tuple[DecryptResult, int]:
        """The message's plaintext and header, and how many frames it had."""
        if type(ciphertext) is bytes and len(ciphertext) < OFFLOAD_THRESHOLD:
            message = read_one_frame_message(
                ciphertext, max_encrypted_data_keys=self.max_encrypted_data_keys
            )
            if message is not None:
                plaintext = await self._open_one_frame(message, encryption_context)
                return DecryptResult(plaintext, message.header), 1
        decryptor = MessageDecryptor(max_encrypted_data_keys=self.max_encrypted_data_keys)
        decryptor.receive_data(ciphertext)
        decryptor.receive_eof()
        parsed = decryptor.read_header()
        assert parsed is not None  # at EOF an incomplete header raises instead
        large = memoryview(ciphertext).nbytes >= OFFLOAD_THRESHOLD
        header = parsed.header
        if large and not (
            header.content_type is ContentType.FRAMED and header.frame_length < LARGE_FRAME
        ):
            # Large frames or a non-framed body: opened piece by piece as a stream does.
            stream = DecryptingStream(
                ciphertext,
                partial(self._materials.decryption_plan, reproduced_context=encryption_context),
                max_encrypted_data_keys=self.max_encrypted_data_keys,
                allow_signed=True,
                stats=self._stats,
            )
            plaintext = await stream.read_all()
            assert stream.header is not None
            return DecryptResult(plaintext, stream.header), stream.frames
        plan = await self._materials.decryption_plan(header, encryption_context)
        decryptor.begin_body(
            plan.data_key,
            required_encryption_context=plan.required_context,
            verifier=plan.verifier,
        )
        if large:
            # Opened in place into the plaintext's own buffer, a step at a time.
            whole = decryptor.read_all_in_steps()
            await in_steps(whole.advance)
            plaintext = whole.plaintext()
        else:
            plaintext = decryptor.read_all()
        stats = self._stats
        stats.messages_decrypted += 1
        stats.bytes_decrypted += len(plaintext)
        return DecryptResult(plaintext, parsed.header), decryptor.frames

    async def _open_one_frame(
        self, message: OneFrameMessage, encryption_context: Mapping[str, str] | None
    ) -> bytes:
        """A small one-frame message's plaintext (see :class:`OneFrameMessage`): the key
        manager's plan as for any message, then the commitment, the header tag and the
        frame tag checked straight on the input's buffer, in that order, before the
        plaintext is counted and returned. Input of any other shape never gets here, so
        errors are the general path's."""
        # No verifier: the one-frame suite does not sign (a header that says otherwise
        # was refused by the key manager).
        materials, _ = await self._materials.decryption_materials(
            message.header, encryption_context, serialized_edks=message.edks
        )
        assert materials.plaintext_data_key is not None
        plaintext = message.open(materials.plaintext_data_key, required_pairs(materials))
        stats = self._stats
        stats.messages_decrypted += 1
        stats.bytes_decrypted += len(plaintext)
        return plaintext

    def decrypt_stream(
        self,
        source: StreamSource,
        *,
        encryption_context: Mapping[str, str] | None = None,
        allow_signed: bool = True,
    ) -> DecryptingStream:
        """Decrypt one message from ``source``, returned as an async iterator of ``bytes``.

        Plaintext is released frame by frame, each only after its tag verified; the last
        frame only once the source ended with nothing after the message (and, for signed
        messages, the signature verified). If iteration raises, discard what came before:
        it is authentic but incomplete. Signed messages: earlier frames are released
        before the signature is checked at the end, as in the AWS Encryption SDK; pass
        ``allow_signed=False`` to refuse them instead (:class:`SignedStreamRefusedError`).
        """
        self._require_open()
        check_source(source)

        def plan(header: MessageHeader) -> Awaitable[DecryptionPlan]:
            return self._materials.decryption_plan(header, encryption_context)

        return DecryptingStream(
            source,
            plan,
            max_encrypted_data_keys=self.max_encrypted_data_keys,
            allow_signed=allow_signed,
            stats=self._stats,
            watch=self._stream_watch("decrypt", encryption_context),
        )

    async def decrypt_file(
        self,
        source: str | os.PathLike[str],
        destination: str | os.PathLike[str],
        *,
        encryption_context: Mapping[str, str] | None = None,
        allow_signed: bool = True,
        overwrite: bool = False,
    ) -> MessageHeader:
        """Stream the encrypted file ``source`` into ``destination`` (mode 0600), which
        appears only once the whole message verified: on any error nothing is left."""
        await check_destination(destination)
        stream = self.decrypt_stream(
            file_chunks(source), encryption_context=encryption_context, allow_signed=allow_signed
        )
        return await save_stream(stream, destination, overwrite=overwrite)

    # -- rotation ------------------------------------------------------------------------

    async def reencrypt(
        self,
        message: _BytesLike,
        *,
        to_keyring: Keyring,
        encryption_context: Mapping[str, str] | None = None,
        algorithm_suite: AlgorithmSuite | None = None,
        frame_length: int | None = None,
    ) -> bytes:
        """``message`` decrypted with this client and encrypted again under
        ``to_keyring``: key rotation.

        The whole old message is verified (every frame, the signature) before the new
        one is sealed. The new message has a new message ID, so a new derived key and
        new frames, and a data key other than the old message's; that data key comes
        from ``to_keyring`` through a data-key cache of its own (this client's
        ``CacheConfig``), so rotating many messages with the same context costs one wrap
        per cached data key, not one KMS call per message.

        The new message keeps the old one's stored context and suite (a legacy suite
        becomes its key-committing successor, signed if it was signed) unless one is
        given; pairs passed in ``encryption_context`` that the old header did not store
        stay required (authenticated, not stored) in the new one. ``to_keyring`` is
        opened on first use and closed with this client: pass the same object each time
        (a client holds at most ``MAX_REENCRYPTION_TARGETS``, 16, distinct targets).
        """
        self._require_open()
        message = _checked_bytes(message, "message")
        _check_keyring(to_keyring, "to_keyring")
        frame_length = self._frame_length_or_default(frame_length)
        old = await self.decrypt_with_header(message, encryption_context=encryption_context)
        encryptor = await self._reencryptor(
            old.header,
            to_keyring,
            encryption_context,
            algorithm_suite,
            frame_length,
            len(old.plaintext),
        )
        return await self._seal(encryptor, old.plaintext)

    def reencrypt_stream(
        self,
        source: StreamSource,
        *,
        to_keyring: Keyring,
        encryption_context: Mapping[str, str] | None = None,
        algorithm_suite: AlgorithmSuite | None = None,
        frame_length: int | None = None,
    ) -> ReencryptingStream:
        """:meth:`reencrypt` for a stream, at constant memory: the old message's
        verified plaintext is sealed again as it arrives.

        The new message's final frame comes only after the old message verified to its
        end; if it does not, iteration raises and the new message is incomplete (any
        reader refuses it). A ``bytes`` source may reuse a cached data key of
        ``to_keyring``; another source gets a fresh data key (one wrap per stream), as
        with :meth:`encrypt_stream` without ``plaintext_length``.
        """
        length_bound = (
            memoryview(source).nbytes
            if isinstance(source, (bytes, bytearray, memoryview))
            else None
        )
        return self._reencrypt_stream(
            source,
            to_keyring=to_keyring,
            encryption_context=encryption_context,
            algorithm_suite=algorithm_suite,
            frame_length=frame_length,
            length_bound=length_bound,
        )

    async def reencrypt_file(
        self,
        source: str | os.PathLike[str],
        destination: str | os.PathLike[str],
        *,
        to_keyring: Keyring,
        encryption_context: Mapping[str, str] | None = None,
        algorithm_suite: AlgorithmSuite | None = None,
        frame_length: int | None = None,
        overwrite: bool = False,
    ) -> MessageHeader:
        """:meth:`reencrypt` from file to file at constant memory: ``destination``
        (mode 0600) appears only once the whole old message verified and the new one
        is complete; on any error nothing is left. Returns the new message's header."""
        await check_destination(destination)
        info = await anyio.Path(source).stat()
        # A regular file's size bounds its plaintext (and lets the new message use a
        # cached data key); a pipe's or a device's says nothing.
        size = info.st_size if stat.S_ISREG(info.st_mode) else None
        stream = self._reencrypt_stream(
            file_chunks(source),
            to_keyring=to_keyring,
            encryption_context=encryption_context,
            algorithm_suite=algorithm_suite,
            frame_length=frame_length,
            length_bound=size,
        )
        return await save_stream(stream, destination, overwrite=overwrite)

    def _reencrypt_stream(
        self,
        source: StreamSource,
        *,
        to_keyring: Keyring,
        encryption_context: Mapping[str, str] | None,
        algorithm_suite: AlgorithmSuite | None,
        frame_length: int | None,
        length_bound: int | None,
    ) -> ReencryptingStream:
        """``length_bound``: at least the plaintext's length (the ciphertext's length
        will do), or None. The data-key cache charges it against a key's byte limit,
        which is conservative: a cached key may be reused only when that is known."""
        self._require_open()
        check_source(source)
        _check_keyring(to_keyring, "to_keyring")
        plaintext = self.decrypt_stream(source, encryption_context=encryption_context)
        checked_frame_length = self._frame_length_or_default(frame_length)

        def start(old: MessageHeader) -> Awaitable[MessageEncryptor]:
            return self._reencryptor(
                old,
                to_keyring,
                encryption_context,
                algorithm_suite,
                checked_frame_length,
                length_bound,
            )

        return ReencryptingStream(plaintext, start, length_bound=length_bound, stats=self._stats)

    async def _reencryptor(
        self,
        old: MessageHeader,
        to_keyring: Keyring,
        reproduced: Mapping[str, str] | None,
        algorithm_suite: AlgorithmSuite | None,
        frame_length: int,
        length_bound: int | None,
    ) -> MessageEncryptor:
        """The encryptor of the new message for the old message ``old``: same stored
        context (required pairs stay required), same or successor suite, a data key
        from ``to_keyring``'s own key manager (cached like :meth:`encrypt`'s)."""
        target = await self._opened(to_keyring)
        context = {k: v for k, v in old.encryption_context.items() if k != PUBLIC_KEY_FIELD}
        reproduced = dict(reproduced or {})
        required = {k for k in reproduced if k not in context}
        context.update(reproduced)
        suite = algorithm_suite or old.algorithm_suite
        if suite not in WRITABLE_SUITES:
            # A legacy message: re-encryption is the moment to move it to a key-
            # committing suite, keeping its signature if it had one.
            suite = (
                AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384
                if suite.signing
                else DEFAULT_SUITE
            )
        manager = self._managers[id(target)]
        plan = await manager.encryption_plan(
            encryption_context=context,
            algorithm_suite=suite,
            required_encryption_context_keys=frozenset(required),
            plaintext_length=length_bound,
        )
        if not set(plan.materials.encrypted_data_keys).isdisjoint(old.encrypted_data_keys):
            # The cache handed back the old message's own data key (re-encrypting under
            # the same keyring, or twice to one target): the new message ID alone would
            # keep nonces apart, but rotation promises a new data key, so get one.
            plan = await manager.encryption_plan(
                encryption_context=context,
                algorithm_suite=suite,
                required_encryption_context_keys=frozenset(required),
                plaintext_length=None,
            )
        return self._encryptor_for(plan, frame_length)

    async def _opened(self, keyring: Keyring) -> Keyring:
        """``keyring``, attached to this client and opened once (concurrent first uses
        wait for the one opening); closed when the client exits."""
        self._require_open()  # never open a keyring that nothing would close
        if keyring is self.keyring or id(keyring) in self._other_keyrings:
            return keyring
        async with self._opening:
            if id(keyring) not in self._other_keyrings:
                if len(self._other_keyrings) >= MAX_REENCRYPTION_TARGETS:
                    # Each target stays open (a KMS client, a data-key cache) until the
                    # client exits: a new keyring object per call would pile them up.
                    raise ConfigurationError(
                        f"this client already holds {MAX_REENCRYPTION_TARGETS} re-encryption "
                        "target keyrings, each open until the client exits: pass the same "
                        "keyring object every time you re-encrypt to the same keys"
                    )
                keyring.attach(self._runtime)
                await keyring.open()
                if self._state != "open":
                    # The client exited while this keyring was opening: nothing would
                    # close it later, so close it now and refuse the call.
                    await keyring.close()
                    self._require_open()
                self._other_keyrings[id(keyring)] = keyring
                self._managers[id(keyring)] = self._key_manager(keyring)
        return keyring

    def _key_manager(self, keyring: Keyring) -> KeyManager:
        """Caching and coalescing for ``keyring``'s data keys, on this client's
        configuration, coalescer and stats (the client's own keyring, and each
        re-encryption target, gets one)."""
        return KeyManager(
            DefaultMaterialsManager(
                keyring,
                commitment_policy=self.commitment_policy,
                max_encrypted_data_keys=self.max_encrypted_data_keys,
            ),
            cache=self._cache_config if keyring.caches_data_keys else None,
            coalescer=self._coalescer,
            clock=self._clock,
            stats=self._stats,
            observer=self._observer,
        )
