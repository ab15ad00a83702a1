"""The one place Google Cloud KMS is called: google-cloud-kms's async (gRPC) client.

Every call runs under the keyring's deadline, retries included. The client's own retry
(60 s, whatever ``timeout=`` says) is switched off (``retry=None``) and each attempt gets
``timeout=`` the time left, so the deadline bounds the call. Statuses that say nothing
about the request (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, INTERNAL) and a
CRC32C that does not match are retried with jittered backoff within the deadline; the
others (PERMISSION_DENIED, NOT_FOUND, INVALID_ARGUMENT, FAILED_PRECONDITION...) are
answers and end the call. The client's circuit breaker for the key's location hears of
each outage and each answer, as for AWS KMS (``kms_clients.KmsClients.call``).

google-cloud-kms is imported when the keyring opens, so ``import aioenvelope`` works
without the ``[gcp]`` extra.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from ...errors import ConfigurationError, GcpKmsError
from ...telemetry import note_attempt
from .._remote import last_of_attempts, log_failure, observe_call, record_verdict

if TYPE_CHECKING:
    from google.auth.credentials import Credentials
    from google.cloud.kms_v1 import KeyManagementServiceAsyncClient

    from ...runtime import Runtime

__all__ = ["GcpKmsTransport", "crc32c"]

log = logging.getLogger("aioenvelope.gcp")
T = TypeVar("T")

SERVICE = "GCP KMS"  # what the circuit breaker counts failures of
SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)
TRANSIENT = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "INTERNAL"})
_BACKOFF_BASE = 0.05  # seconds before the first retry (at most; full jitter)
_BACKOFF_CAP = 1.0
_MESSAGE_LIMIT = 300  # characters of the service's own error text
# How gRPC reports an exception raised by the call credentials' plugin (google-auth).
_PLUGIN_FAILED = "Getting metadata from plugin failed"
_INSTALL = "the Google Cloud KMS keyring needs the [gcp] extra: pip install 'aioenvelope[gcp]'"


def crc32c(data: bytes) -> int:
    import google_crc32c

    return int(google_crc32c.value(data))


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MESSAGE_LIMIT else text[:_MESSAGE_LIMIT] + "..."


class ChecksumMismatch(Exception):
    """A response's CRC32C did not match its data (or the service did not verify the
    request's): corrupted on the way, so worth another attempt."""


class InvalidResponse(Exception):
    """A response that is no answer to the request (another key, a wrong length)."""


class _Closed(Exception):
    """The transport was closed (the client exited) while a call was under way."""


async def default_credentials(deadline: float) -> Credentials:
    """``google.auth.default()``, in a worker thread and bounded by ``deadline``: with no
    credentials in the environment it probes the GCE metadata server, which off Google
    Cloud may take seconds to fail. The thread is abandoned at the deadline (it ends on
    its own, after the library's own timeout)."""
    try:
        import google.auth
        import google.auth.exceptions
    except ImportError as exc:  # pragma: no cover - the extra is installed in tests
        raise ConfigurationError(_INSTALL) from exc

    def find() -> Credentials:
        credentials, _project = google.auth.default(scopes=list(SCOPES))
        return credentials

    said = (
        "no Google credentials: set GOOGLE_APPLICATION_CREDENTIALS to a service account "
        "key file, run 'gcloud auth application-default login', run on Google Cloud, or "
        "pass credentials="
    )
    with anyio.move_on_after(deadline) as scope:
        try:
            return await anyio.to_thread.run_sync(find, abandon_on_cancel=True)
        except google.auth.exceptions.DefaultCredentialsError as exc:
            raise ConfigurationError(f"{said} ({_clip(str(exc))})") from None
    assert scope.cancelled_caught
    raise ConfigurationError(
        f"{said} (none found within the deadline of {deadline:g} s: the search ends with "
        "a probe of the GCE metadata server, which did not answer in time)"
    )


# google-cloud-kms's transports log each request and response at DEBUG (when the
# ``google`` logger is set to it), payload included as JSON in the record's extras: an
# Encrypt request or a Decrypt response holds the plaintext data key. These methods'
# payloads are redacted on the way, before any handler sees the record.
_LOGGING_TRANSPORTS = tuple(
    f"google.cloud.kms_v1.services.key_management_service.transports.{name}"
    for name in ("grpc_asyncio", "grpc", "rest")
)
_SECRET_RPC = re.compile(
    r"(?:Raw|Asymmetric)?(?:Encrypt|Decrypt)|Decapsulate|GenerateRandomBytes", re.IGNORECASE
)
_PAYLOAD_EXTRAS = ("request", "response", "httpRequest", "httpResponse")
REDACTED = "<redacted by aioenvelope: may hold key material>"


class _RedactKeyMaterial(logging.Filter):
    """Replaces the payload of Cloud KMS cryptographic calls' log records (Encrypt,
    Decrypt and the like) with :data:`REDACTED`; other records pass unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        rpc = str(getattr(record, "rpcName", "")).rstrip("'").rsplit("/", 1)[-1]
        if not _SECRET_RPC.fullmatch(rpc):
            return True
        for extra in _PAYLOAD_EXTRAS:
            value = getattr(record, extra, None)
            if isinstance(value, dict) and "payload" in value:
                setattr(record, extra, {**value, "payload": REDACTED})
        return True


_REDACT = _RedactKeyMaterial()


def redact_transport_logs() -> None:
    """Install the redacting filter on google-cloud-kms's transport loggers (once)."""
    for name in _LOGGING_TRANSPORTS:
        logger = logging.getLogger(name)
        if _REDACT not in logger.filters:
            logger.addFilter(_REDACT)


class GcpKmsTransport:
    """Calls to Cloud KMS for one keyring; opened and closed with it."""

    def __init__(
        self,
        *,
        client: KeyManagementServiceAsyncClient | None,
        credentials: Credentials | None,
        client_options: Mapping[str, Any] | None,
        deadline: float,
        max_attempts: int,
    ) -> None:
        self.deadline = deadline
        self.max_attempts = max_attempts
        self.calls: collections.Counter[str] = collections.Counter()
        self.runtime: Runtime | None = None
        self._supplied = client
        self._client: KeyManagementServiceAsyncClient | None = client
        self._owned: KeyManagementServiceAsyncClient | None = None
        self._credentials = credentials
        self._options = dict(client_options or {})
        self._open = False
        self._epoch = 0  # one more at each close: a call of an earlier epoch was cut off

    def __repr__(self) -> str:
        return "GcpKmsTransport()"

    async def open(self) -> None:
        if self._open:
            return
        try:
            from google.cloud.kms_v1 import KeyManagementServiceAsyncClient
        except ImportError as exc:
            raise ConfigurationError(_INSTALL) from exc
        redact_transport_logs()  # a caller's client= logs through the same loggers
        if self._supplied is None:
            options = dict(self._options)
            transport = options.get("transport")
            if transport is None or isinstance(transport, str) or callable(transport):
                # A transport instance holds its own credentials; anything else needs ours.
                credentials = self._credentials or await default_credentials(self.deadline)
                options["credentials"] = credentials
            # Made here, inside the running loop: its gRPC channel belongs to this loop.
            self._owned = self._client = _make_client(KeyManagementServiceAsyncClient, options)
        self._open = True

    async def close(self) -> None:
        if not self._open:
            return
        self._open = False
        self._epoch += 1
        owned, self._owned = self._owned, None
        self._client = self._supplied
        if owned is not None:
            close: Callable[[], Awaitable[None]] = owned.transport.close
            with anyio.CancelScope(shield=True):  # a half-closed channel leaks its tasks
                await close()

    def _closed_error(self, operation: str, key_id: str) -> ConfigurationError:
        return ConfigurationError(
            f"the EnvelopeClient was closed while a Cloud KMS {operation} with key {key_id} "
            "was under way: close the client only after its calls finish"
        )

    # -- one call ----------------------------------------------------------------------

    async def call(
        self,
        operation: str,
        key_id: str,
        breaker_name: str,
        request: Mapping[str, Any],
        check: Callable[[Any], Any],
        *,
        unwrap: bool = False,
    ) -> Any:
        """:meth:`_guarded_call` inside its telemetry watch."""
        endpoint = getattr(self._client, "api_endpoint", None)
        with observe_call(
            self.runtime,
            GcpKmsError.SERVICE,
            operation,
            key_id,
            endpoint if isinstance(endpoint, str) else None,
            region=breaker_name.partition(" ")[2] or None,
        ):
            return await self._guarded_call(
                operation, key_id, breaker_name, request, check, unwrap=unwrap
            )

    async def _guarded_call(
        self,
        operation: str,
        key_id: str,
        breaker_name: str,
        request: Mapping[str, Any],
        check: Callable[[Any], Any],
        *,
        unwrap: bool = False,
    ) -> Any:
        """Call ``operation`` (``Encrypt``, ``Decrypt``, ``GetCryptoKey``) with
        ``request`` and return ``check(response)``, or raise :class:`GcpKmsError`.

        ``check`` raises :class:`ChecksumMismatch` (retried) or :class:`InvalidResponse`.
        In order: the location's breaker (fails fast, costing nothing, while it is down),
        for an unwrap one token of the decrypt rate limit, then the request, retried.
        One deadline covers every attempt (not the wait for the client's rate limit).
        """
        if not self._open:
            raise ConfigurationError(
                "the Google Cloud KMS keyring is not open: use it inside "
                "`async with EnvelopeClient(...)`"
            )
        runtime = self.runtime
        breaker = runtime.breaker(breaker_name) if runtime is not None else None
        if breaker is not None:
            breaker.before_call(SERVICE)
        epoch = self._epoch
        try:
            deadline_at = anyio.current_time() + self.deadline
            if unwrap and runtime is not None:
                waited_from = anyio.current_time()
                await runtime.admit_remote_decrypt()
                deadline_at += anyio.current_time() - waited_from  # ours, not Google's
            self.calls[operation] += 1  # counted once sent, not its retries
            result = await self._attempts(operation, key_id, request, check, deadline_at)
        except GcpKmsError as exc:
            log_failure(
                log, "Cloud KMS", exc, breaker_name.partition(" ")[2] or None, unwrap=unwrap
            )
            # Cut off by the close, or never sent (no credentials): no verdict.
            unasked = epoch != self._epoch or exc.error_code == "CredentialUnavailable"
            record_verdict(breaker, SERVICE, exc, unasked=unasked)
            if epoch != self._epoch:
                raise self._closed_error(operation, key_id) from exc
            raise
        except _Closed:
            if breaker is not None:
                breaker.record_abandoned()
            raise self._closed_error(operation, key_id) from None
        except BaseException:
            if breaker is not None:
                breaker.record_abandoned()  # cancelled, or not sent: no verdict
            raise
        record_verdict(breaker, SERVICE, None, unasked=epoch != self._epoch)
        return result

    async def _attempts(
        self,
        operation: str,
        key_id: str,
        request: Mapping[str, Any],
        check: Callable[[Any], Any],
        deadline_at: float,
    ) -> Any:
        epoch = self._epoch
        failures = 0
        last: GcpKmsError | None = None
        with anyio.move_on_at(deadline_at):
            while True:
                if epoch != self._epoch:
                    raise _Closed
                remaining = deadline_at - anyio.current_time()
                if remaining <= 0:
                    break
                try:
                    return await self._attempt(operation, key_id, request, check, remaining)
                except GcpKmsError as exc:
                    if epoch != self._epoch:
                        raise _Closed from None
                    if not exc.transient:
                        raise
                    failures += 1
                    last = exc
                if failures >= self.max_attempts:
                    raise last_of_attempts(last, failures)
                delay = random.uniform(0, min(_BACKOFF_CAP, _BACKOFF_BASE * 2**failures))  # noqa: S311 - jitter, not a secret
                if anyio.current_time() + delay >= deadline_at:
                    raise last_of_attempts(last, failures)
                await anyio.sleep(delay)
        if epoch != self._epoch:
            raise _Closed
        raise self._timeout(operation, key_id, last, failures)

    async def _attempt(
        self,
        operation: str,
        key_id: str,
        request: Mapping[str, Any],
        check: Callable[[Any], Any],
        remaining: float,
    ) -> Any:
        from google.api_core import exceptions as api_exceptions

        client = self._client
        if client is None or not self._open:
            raise _Closed
        method = {
            "Encrypt": client.encrypt,
            "Decrypt": client.decrypt,
            "GetCryptoKey": client.get_crypto_key,
        }[operation]
        where = f"Cloud KMS {operation} with key {key_id}"
        log.debug("Cloud KMS %s with key %s", operation, key_id)
        # Google's exception is not chained (nor left as __context__, so the error is
        # made here and raised after the except block): it holds the gRPC call, which
        # keeps the channel's connection open, even after the channel is closed, for as
        # long as anything (a caller, a log record) keeps the error.
        failure: GcpKmsError | None = None
        note_attempt()  # telemetry counts what is sent, retries included
        try:
            response = await _cancellable(
                method(request=dict(request), retry=None, timeout=remaining)
            )
        except api_exceptions.GoogleAPICallError as exc:
            status = exc.grpc_status_code
            code = status.name if status is not None else type(exc).__name__
            text = _clip(str(exc.message or ""))
            transient = code in TRANSIENT
            if code == "INVALID_ARGUMENT" and "checksum" in text.lower():
                # Cloud KMS checked our CRC32C and it did not match: corrupted on the way.
                code, transient = "ChecksumMismatch", True
            elif code == "UNAVAILABLE" and text.startswith(_PLUGIN_FAILED):
                # gRPC's word for credentials that could not be had (google-auth raised
                # in the auth plugin, e.g. RefreshError: invalid_grant): no request was
                # sent, so nothing about the service; retrying will not mend them.
                code, transient = "CredentialUnavailable", False
            failure = GcpKmsError(
                f"{where} failed: {code}: {text.rstrip('.')}{_hint(code, operation)}",
                operation=operation,
                key_id=key_id,
                error_code=code,
                transient=transient,
            )
        except api_exceptions.RetryError as exc:  # not with retry=None; kept for safety
            failure = GcpKmsError(
                f"{where} failed: {_clip(str(exc))}",
                operation=operation,
                key_id=key_id,
                error_code="UNAVAILABLE",
                transient=True,
            )
        if failure is not None:
            raise failure
        try:
            return check(response)
        except ChecksumMismatch as exc:
            raise GcpKmsError(
                f"{where}: {exc} (corrupted on the way: retried within the deadline)",
                operation=operation,
                key_id=key_id,
                error_code="ChecksumMismatch",
                transient=True,
            ) from None
        except InvalidResponse as exc:
            raise GcpKmsError(
                f"{where}: {exc}",
                operation=operation,
                key_id=key_id,
                error_code="InvalidResponse",
                transient=False,
            ) from None

    def _timeout(
        self, operation: str, key_id: str, last: GcpKmsError | None, failures: int
    ) -> GcpKmsError:
        said = (
            f"did not finish within the call's deadline of {self.deadline:g} s (one "
            "deadline for the whole call, retries included)"
        )
        if last is not None:
            tries = "attempt" if failures == 1 else "attempts"
            said += f": after {failures} failed {tries}, the last with {last.error_code}"
        return GcpKmsError(
            f"Cloud KMS {operation} with key {key_id} {said}",
            operation=operation,
            key_id=key_id,
            error_code="Timeout",
            transient=True,
        )


def _make_client(
    factory: type[KeyManagementServiceAsyncClient], options: Mapping[str, Any]
) -> KeyManagementServiceAsyncClient:
    """The client, or a ConfigurationError naming ``client_options`` for options it
    refuses (an unknown keyword, ``credentials_file`` beside the credentials...)."""
    from google.api_core import exceptions as api_exceptions
    from google.auth import exceptions as auth_exceptions

    try:
        return factory(**options)
    except (
        TypeError,
        ValueError,
        api_exceptions.GoogleAPIError,
        auth_exceptions.GoogleAuthError,
    ) as exc:
        hint = (
            ": credentials come from credentials= or google.auth.default(), not a "
            "credentials file in client_options"
            if isinstance(exc, api_exceptions.DuplicateCredentialArgs)
            else ""
        )
        raise ConfigurationError(
            "the Google Cloud KMS keyring's client_options were refused by "
            f"KeyManagementServiceAsyncClient: {type(exc).__name__}: {_clip(str(exc))}{hint}"
        ) from None


async def _cancellable(call: Awaitable[T]) -> T:
    """Await a gRPC call so that a cancel scope (ours at the deadline, or a caller's) can
    cancel it. Awaited directly, a cancelled grpc.aio call raises a CancelledError of its
    own, which anyio does not take for its scope's: it escapes ``move_on_at`` and
    cancels the whole task. Run as a task of its own and waited for, it is cancelled
    and reaped here, and the CancelledError the scope sees is the scope's."""
    task = asyncio.ensure_future(call)
    del call
    try:
        await asyncio.wait({task})
    except BaseException:
        task.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.wait({task})
        if not task.cancelled():
            task.exception()  # seen: no "exception was never retrieved"
        del task
        raise
    try:
        return task.result()
    finally:
        # The task holds its exception, whose traceback holds this frame: no cycle
        # (which would keep the gRPC call, and its connection, until a gc run).
        del task


def _hint(code: str, operation: str) -> str:
    """What to do about an answer, after the service's own words."""
    permission = {
        "Encrypt": "cloudkms.cryptoKeyVersions.useToEncrypt (roles/cloudkms.cryptoKeyEncrypter)",
        "Decrypt": "cloudkms.cryptoKeyVersions.useToDecrypt (roles/cloudkms.cryptoKeyDecrypter)",
        "GetCryptoKey": "cloudkms.cryptoKeys.get (roles/cloudkms.viewer)",
    }[operation]
    return {
        "PERMISSION_DENIED": (
            f". The caller's identity needs {permission} on the key (Cloud KMS also says "
            "this for a key that does not exist, to callers who may not know)"
        ),
        "UNAUTHENTICATED": ". The credentials were refused: expired, revoked or for another project",
        "CredentialUnavailable": (
            ". No access token could be had for the credentials (refused by Google: "
            "expired, revoked or deleted; or the token endpoint could not be reached), so "
            "nothing was sent: fix the credentials"
        ),
        "NOT_FOUND": ". Check the key's resource name (project, location, key ring, key)",
        "FAILED_PRECONDITION": ". The key or its version is not in a usable state (disabled or destroyed?)",
    }.get(code, "")
