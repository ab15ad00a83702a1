"""Long-lived KMS clients, one per region, and the one place KMS is called.

Every call runs under a deadline (retries included); throttling and transient errors are
retried by botocore's own retry modes with jittered backoff, inside that deadline. A
semaphore per region admits at most the connection pool's size at once, so a burst waits
for a connection *before* its deadline starts instead of timing out in the queue.
"""

from __future__ import annotations

import collections
import contextvars
import logging
import os
import urllib.parse
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

import aioboto3
import anyio
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    CredentialRetrievalError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from ..errors import ConfigurationError, DynamoDBError, KMSError, KMSTimeoutError
from ..telemetry import NULL_OBSERVER, CallWatch, note_attempt
from ._log_redaction import release_redaction, retain_redaction

if TYPE_CHECKING:
    from ..runtime import Runtime

__all__ = ["CREDENTIAL_ERROR_CODES", "MAX_CLIENTS", "KmsClients", "KmsSettings"]

log = logging.getLogger("aioenvelope.kms")

# Clients one keyring keeps open at once (each holds a connection pool: about a MiB).
# Keyrings call only regions their configuration names, so this is rarely reached.
MAX_CLIENTS = 16

_METHODS = {
    "GenerateDataKey": "generate_data_key",
    "Encrypt": "encrypt",
    "Decrypt": "decrypt",
    "DescribeKey": "describe_key",
    "GenerateDataKeyWithoutPlaintext": "generate_data_key_without_plaintext",
    "ReEncrypt": "re_encrypt",
}
# Error codes that say nothing about the request itself: an outage, not an answer.
_TRANSIENT_CODES = frozenset(
    {
        "ThrottlingException",
        "Throttling",
        "ThrottledException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "LimitExceededException",
        "KMSInternalException",
        "DependencyTimeoutException",
        "InternalFailure",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "RequestTimeout",
        "RequestTimeoutException",
    }
)


# Errors raised before a request is sent: nothing was asked of the service, so they
# say nothing about it (no breaker verdict), and retrying will not help.
_CREDENTIAL_ERRORS = (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError)
#: The ``error_code`` of a call that failed for want of credentials (nothing was sent).
CREDENTIAL_ERROR_CODES = frozenset(error.__name__ for error in _CREDENTIAL_ERRORS)
_CREDENTIALS_HINT = (
    ". Give AWS credentials the way the AWS CLI takes them: the AWS_ACCESS_KEY_ID and "
    "AWS_SECRET_ACCESS_KEY environment variables, a profile (AWS_PROFILE, "
    "~/.aws/credentials), or an instance or container role"
)
_CONNECTION_HINT = ". Check endpoint_url, the region and the network"
_MESSAGE_LIMIT = 300  # characters of botocore's or the service's own message


class _Attempts:
    """What each failed attempt of one call met, as botocore's retry handler saw it (its
    ``needs-retry`` event): told apart from the caller's other calls by a context
    variable, so that a deadline spent on retries can say on what."""

    __slots__ = ("count", "last")

    def __init__(self) -> None:
        self.count = 0  # failed attempts
        self.last = ""  # what the last one failed with


_ATTEMPTS: contextvars.ContextVar[_Attempts | None] = contextvars.ContextVar(
    "aioenvelope_attempts", default=None
)


def _clip(text: str) -> str:
    text = " ".join(text.split())  # one line
    return text if len(text) <= _MESSAGE_LIMIT else text[:_MESSAGE_LIMIT] + "..."


def _what_failed(exc: BaseException) -> str:
    """One attempt's failure in words, botocore's message kept."""
    if isinstance(exc, (BotoConnectionError, HTTPClientError)):
        return f"a connection error ({_clip(str(exc))})"
    return f"{type(exc).__name__} ({_clip(str(exc))})"


def _record_attempt(
    caught_exception: BaseException | None = None, response: Any = None, **_: Any
) -> None:
    """botocore's ``needs-retry`` hook, after every attempt: note a failed one."""
    attempts = _ATTEMPTS.get()
    if attempts is None:
        return  # a call not made by us (a caller-supplied client's own)
    if caught_exception is not None:
        attempts.count += 1
        attempts.last = _what_failed(caught_exception)
        return
    parsed = response[1] if isinstance(response, tuple) and len(response) == 2 else None
    if not isinstance(parsed, Mapping):
        return
    status = parsed.get("ResponseMetadata", {}).get("HTTPStatusCode", 200)
    error = parsed.get("Error")
    if isinstance(status, int) and status >= 400 and isinstance(error, Mapping):
        attempts.count += 1
        code = str(error.get("Code", status))
        message = str(error.get("Message", "")).strip()
        attempts.last = _clip(f"{code}: {message}" if message else code)


def _record_send(**_: Any) -> None:
    """botocore's ``before-send`` hook, before each HTTP attempt: telemetry counts the
    requests a call sent (none when it failed before sending, e.g. no credentials; none
    for a deadline that fell in a pause between retries)."""
    note_attempt()


def _host_of(url: object) -> str | None:
    """``host[:port]`` of an endpoint URL (for telemetry: no scheme, path or userinfo)."""
    if not isinstance(url, str):
        return None
    return urllib.parse.urlsplit(url).netloc.rpartition("@")[2] or None


def _endpoint_of(client: Any) -> str | None:
    """The host a botocore client sends to."""
    return _host_of(getattr(getattr(client, "meta", None), "endpoint_url", None))


def _watch_attempts(client: Any) -> None:
    """Register :func:`_record_attempt` on ``client`` (once, first: before the retry
    handler, which answers the event)."""
    events = getattr(getattr(client, "meta", None), "events", None)
    if events is not None:
        events.register_first(
            "needs-retry", _record_attempt, unique_id="aioenvelope-record-attempt"
        )
        events.register_first("before-send", _record_send, unique_id="aioenvelope-record-send")


class KmsSettings:
    """How KMS is reached; shared by the KMS keyrings' constructors."""

    def __init__(
        self,
        *,
        client: Any = None,
        session: aioboto3.Session | None = None,
        region_name: str | None = None,
        endpoint_url: str | None = None,
        deadline: float = 2.0,
        retry_mode: str = "standard",
        max_attempts: int = 4,
        max_connections: int = 32,
    ) -> None:
        if deadline <= 0:
            raise ConfigurationError("deadline must be a positive number of seconds")
        if retry_mode not in ("standard", "adaptive", "legacy"):
            raise ConfigurationError("retry_mode must be 'standard', 'adaptive' or 'legacy'")
        if max_attempts < 1 or max_connections < 1:
            raise ConfigurationError("max_attempts and max_connections must be at least 1")
        self.client = client
        self.session = session
        self.region_name = region_name
        self.endpoint_url = endpoint_url
        self.deadline = deadline
        self.retry_mode = retry_mode
        self.max_attempts = max_attempts
        self.max_connections = max_connections

    def default_region(self) -> str | None:
        if self.region_name:
            return self.region_name
        if self.client is not None:
            return str(self.client.meta.region_name)
        if self.session is not None and self.session.region_name:
            return str(self.session.region_name)
        return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")


class _Entry:
    """One region's client: its connection gate, and how many calls are using it now.

    ``context`` is the async context manager that opened the client (None for a client
    the caller supplied, which we never close). An entry evicted while calls use it is
    closed by the last of them.
    """

    __slots__ = ("client", "closed", "context", "evicted", "gate", "region", "users")

    def __init__(self, region: str, client: Any, context: Any, max_connections: int) -> None:
        self.region = region
        self.client = client
        self.context = context
        self.gate = anyio.Semaphore(max_connections)
        self.users = 0
        self.evicted = False
        self.closed = False


class KmsClients:
    """The KMS clients of one keyring. Opened and closed with the ``EnvelopeClient``.

    One client per region, made on first use, at most ``max_clients`` at once: to open
    another, the least recently used one is closed (once its calls in flight have
    finished; until then it is no longer used for new calls). A
    caller-supplied client serves its own region, does not count, and is never closed
    here. While the keyring is open, botocore's loggers redact data keys
    (:mod:`._log_redaction`).

    Subclasses serve another AWS service with the same lifetime, deadline, retries and
    breaker (the branch key store's DynamoDB clients): they set ``service``, ``methods``
    and override :meth:`_failure` and :meth:`_count`.
    """

    service = "kms"
    label = "KMS"
    telemetry_name = KMSError.SERVICE  # the service as telemetry and log fields name it
    target = "with key"  # how log lines name what ``key_id`` is
    methods: Mapping[str, str] = _METHODS
    transient_codes: frozenset[str] = _TRANSIENT_CODES

    def __init__(self, settings: KmsSettings, *, max_clients: int = MAX_CLIENTS) -> None:
        self.settings = settings
        self.calls: collections.Counter[str] = collections.Counter()
        self.runtime: Runtime | None = None
        self.max_clients = max(1, max_clients)
        self._entries: collections.OrderedDict[str, _Entry] = collections.OrderedDict()
        self._draining: set[_Entry] = set()  # evicted, closed when their last call ends
        self._open = False
        self._lock = anyio.Lock()
        self._session = settings.session
        self._supplied: _Entry | None = None
        if settings.client is not None:
            region = str(settings.client.meta.region_name)
            self._supplied = _Entry(region, settings.client, None, settings.max_connections)
            _watch_attempts(settings.client)

    async def open(self) -> None:
        if not self._open:
            self._open = True
            retain_redaction()

    async def close(self) -> None:
        if not self._open:
            return
        self._open = False
        owned = [*self._entries.values(), *self._draining]
        self._entries.clear()
        self._draining.clear()
        try:
            errors: list[BaseException] = []
            for entry in reversed(owned):  # newest first, as an exit stack would
                try:
                    await self._close_entry(entry)
                except Exception as exc:
                    errors.append(exc)
            if errors:
                raise errors[0]
        finally:
            release_redaction()

    def region_for(self, key_id: str, arn_region: str | None) -> str:
        region = arn_region or self.settings.default_region()
        if not region:
            raise ConfigurationError(
                f"no AWS region for KMS key {key_id!r}: give a key ARN, region_name, or set "
                "AWS_REGION"
            )
        return region

    async def _close_entry(self, entry: _Entry) -> None:
        if entry.closed or entry.context is None:
            return
        entry.closed = True
        log.debug("closing the %s client for region %s", self.label, entry.region)
        with anyio.CancelScope(shield=True):  # a half-closed client would leak its pool
            await entry.context.__aexit__(None, None, None)

    async def _acquire(self, region: str, operation: str, key_id: str) -> _Entry:
        """The region's entry, with one more user; opens (and evicts) under the lock."""
        supplied = self._supplied
        if supplied is not None and supplied.region == region:
            supplied.users += 1
            return supplied
        entry = self._entries.get(region)
        if entry is None:
            async with self._lock:
                entry = self._entries.get(region)
                if entry is None:
                    await self._evict_to_make_room()
                    entry = await self._open_entry(region, operation, key_id)
                    self._entries[region] = entry
                entry.users += 1
        else:
            entry.users += 1
        if self._entries.get(region) is entry:
            self._entries.move_to_end(region)
        return entry

    async def _release(self, entry: _Entry) -> None:
        entry.users -= 1
        if entry.evicted and entry.users == 0:
            self._draining.discard(entry)
            try:
                await self._close_entry(entry)
            except Exception as exc:  # the call itself is done: report, do not fail it
                log.warning(
                    "closing the evicted %s client for %s failed: %s",
                    self.label,
                    entry.region,
                    type(exc).__name__,
                )

    async def _evict_to_make_room(self) -> None:
        """Evict least recently used clients until one more fits under ``max_clients``
        (before opening it, so that no more than that are ever open but idle)."""
        while len(self._entries) >= self.max_clients:
            _, victim = self._entries.popitem(last=False)
            victim.evicted = True
            if victim.users:
                self._draining.add(victim)  # closed by _release, after its last call
                continue
            try:
                await self._close_entry(victim)
            except Exception as exc:
                log.warning(
                    "closing the evicted %s client for %s failed: %s",
                    self.label,
                    victim.region,
                    type(exc).__name__,
                )

    async def _open_entry(self, region: str, operation: str, key_id: str) -> _Entry:
        """Open a client for ``region``. Whatever botocore raises (a malformed region, an
        unusable endpoint) becomes a :class:`KMSError` naming the region, not a botocore
        exception escaping the library."""
        if not self._open:
            raise ConfigurationError(
                "the KMS keyring is not open: use it inside `async with EnvelopeClient(...)`"
            )
        if self._session is None:
            self._session = aioboto3.Session()
        config = Config(
            retries={
                "mode": self.settings.retry_mode,
                # botocore's "max_attempts" counts retries; this counts attempts.
                "total_max_attempts": self.settings.max_attempts,
            },
            connect_timeout=self.settings.deadline,
            read_timeout=self.settings.deadline,
            max_pool_connections=self.settings.max_connections,
        )
        log.debug("opening a %s client for region %s", self.label, region)
        try:
            context = self._session.client(
                self.service,
                region_name=region,
                endpoint_url=self.settings.endpoint_url,
                config=config,
            )
            client = await context.__aenter__()
        except (BotoCoreError, ValueError) as exc:
            raise self._failure(
                operation,
                key_id,
                f"failed: no {self.label} client could be opened for region "
                f"{region[:64]!r} ({type(exc).__name__}: {str(exc)[:200]}). "
                "Check region_name, the key ARN's region and endpoint_url",
                error_code=type(exc).__name__,
                transient=False,
            ) from exc
        _watch_attempts(client)
        return _Entry(region, client, context, self.settings.max_connections)

    async def call(
        self,
        operation: str,
        region: str,
        key_id: str,
        params: Mapping[str, Any],
        *,
        admitted: bool = False,
        expected: Collection[str] | None = (),
    ) -> dict[str, Any]:
        """Call ``operation`` and return its response, or raise a :class:`KMSError`.

        In order: the region's breaker (fails fast while KMS is down, costing nothing),
        for a Decrypt one token of the decrypt rate limit (before any await on I/O, so
        concurrent requests meet the bucket in the order they came; ``admitted=True``
        when the caller took it already, before earlier calls of the same unwrap), the
        region's client (opened on first use, errors mapped), then the call.

        ``expected``: error codes the caller handles, logged at DEBUG rather than
        WARNING; ``None``: every answered refusal (an unwrap trying a key it may not
        be allowed to use). Outages are always WARNING.
        """
        runtime = self.runtime
        observer = runtime.observer if runtime is not None else NULL_OBSERVER
        with observer.call(
            self.telemetry_name,
            operation,
            key_id=key_id,
            endpoint=_host_of(self.settings.endpoint_url),
            region=region,
        ) as watch:
            return await self._guarded_call(
                operation, region, key_id, params, admitted, expected, watch
            )

    async def _guarded_call(
        self,
        operation: str,
        region: str,
        key_id: str,
        params: Mapping[str, Any],
        admitted: bool,
        expected: Collection[str] | None,
        watch: CallWatch,
    ) -> dict[str, Any]:
        runtime = self.runtime
        breaker = runtime.breaker(region) if runtime is not None else None
        if breaker is not None:
            breaker.before_call(self.label)  # fails fast, with no I/O, while it is down
        try:
            if operation == "Decrypt" and runtime is not None and not admitted:
                await runtime.admit_remote_decrypt()
            entry = await self._acquire(region, operation, key_id)
        except BaseException:
            if breaker is not None:
                breaker.record_abandoned()  # KMS was not asked: no verdict on it
            raise
        if watch.endpoint is None:
            watch.endpoint = _endpoint_of(entry.client)
        try:
            response = await self._call(entry, operation, region, key_id, params)
        except (KMSError, DynamoDBError) as exc:
            # An outage, or a refusal nobody expected: WARNING. A refusal the caller
            # handles (a key this keyring may not use, a table not there yet): DEBUG,
            # or a decrypt of messages carrying others' keys would log one per message.
            quiet = not exc.transient and (expected is None or exc.error_code in expected)
            log.log(
                logging.DEBUG if quiet else logging.WARNING,
                "%s %s %s %s in %s failed: %s",
                self.label,
                operation,
                self.target,
                key_id,
                region,
                exc.error_code,
                extra={
                    "aioenvelope_endpoint": watch.endpoint or region,
                    "aioenvelope_service": self.telemetry_name,
                    "aioenvelope_operation": operation,
                    "aioenvelope_error_code": exc.error_code,
                },
            )
            if breaker is not None:
                if isinstance(exc.__cause__, _CREDENTIAL_ERRORS):
                    breaker.record_abandoned()  # nothing was sent: no verdict on the service
                elif exc.transient:
                    breaker.record_failure(self.label, exc)
                else:
                    breaker.record_success(self.label)  # answered (with an error): it is up
            raise
        except BaseException:
            if breaker is not None:
                breaker.record_abandoned()  # cancelled before an answer
            raise
        finally:
            await self._release(entry)
        if breaker is not None:
            breaker.record_success(self.label)
        return response

    async def _call(
        self,
        entry: _Entry,
        operation: str,
        region: str,
        key_id: str,
        params: Mapping[str, Any],
    ) -> dict[str, Any]:
        method = getattr(entry.client, self.methods[operation])
        async with entry.gate:
            log.debug("%s %s %s %s in %s", self.label, operation, self.target, key_id, region)
            self._count(operation)
            attempts = _Attempts()
            token = _ATTEMPTS.set(attempts)
            try:
                with anyio.fail_after(self.settings.deadline):
                    response: dict[str, Any] = await method(**params)
            except TimeoutError as exc:
                raise self._failure(
                    operation,
                    key_id,
                    self._timed_out(attempts),
                    error_code="Timeout",
                    transient=True,
                ) from exc
            except ClientError as exc:
                raise self._from_client_error(exc, operation, key_id) from exc
            except _CREDENTIAL_ERRORS as exc:
                raise self._failure(
                    operation,
                    key_id,
                    f"failed: {_clip(str(exc))}{_CREDENTIALS_HINT}",
                    error_code=type(exc).__name__,
                    transient=False,
                ) from exc
            except BotoCoreError as exc:
                raise self._failure(
                    operation,
                    key_id,
                    self._failed(exc, attempts),
                    error_code=type(exc).__name__,
                    transient=True,
                ) from exc
            finally:
                _ATTEMPTS.reset(token)
        return response

    def _timed_out(self, attempts: _Attempts) -> str:
        said = f"did not finish within {self.settings.deadline:g} s (retries included)"
        if not attempts.count:
            return said  # the first attempt had no answer by then
        tries = "attempt" if attempts.count == 1 else "attempts"
        said += (
            f": the time went on retries after {attempts.count} failed {tries}, the last "
            f"with {attempts.last}"
        )
        return said + (_CONNECTION_HINT if attempts.last.startswith("a connection") else "")

    @staticmethod
    def _failed(exc: BotoCoreError, attempts: _Attempts) -> str:
        """A botocore error that ended the call (retries spent, or not retryable)."""
        what = _what_failed(exc)
        count = max(attempts.count, 1)
        said = f"failed with {what}" if count == 1 else f"failed {count} times, last with {what}"
        connection = isinstance(exc, (BotoConnectionError, HTTPClientError))
        return said + (_CONNECTION_HINT if connection else "")

    def _count(self, operation: str) -> None:
        self.calls[operation] += 1
        if self.runtime is not None:
            self.runtime.stats.kms_calls[operation] += 1

    def _failure(
        self, operation: str, key_id: str, what: str, *, error_code: str, transient: bool
    ) -> KMSError | DynamoDBError:
        """The library error for a failed call: ``what`` says how it failed."""
        error = KMSTimeoutError if error_code == "Timeout" else KMSError
        return error(
            f"KMS {operation} with key {key_id} {what}",
            operation=operation,
            key_id=key_id,
            error_code=error_code,
            transient=transient,
        )

    def _from_client_error(
        self, exc: ClientError, operation: str, key_id: str
    ) -> KMSError | DynamoDBError:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "Unknown"))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        message = str(error.get("Message", "")).strip()
        transient = code in self.transient_codes or status >= 500
        detail = f": {message}" if message else ""
        hint = _HINTS.get(code, "") if self.service == "kms" else ""
        return self._failure(
            operation,
            key_id,
            f"failed with {code}{detail}{hint}",
            error_code=code,
            transient=transient,
        )


_HINTS = {
    "AccessDeniedException": " (check the key policy and IAM permissions for this operation)",
    "NotFoundException": " (the key or alias does not exist in this account and region)",
    "DisabledException": " (the key is disabled; enable it or use another key)",
    "KMSInvalidStateException": " (the key is pending deletion, pending import or unavailable)",
    "InvalidCiphertextException": (
        " (the encrypted data key is corrupt, or the encryption context does not match)"
    ),
    "IncorrectKeyException": " (the encrypted data key was made under a different key)",
}
