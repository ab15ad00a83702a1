"""Long-lived KMS clients, one per region, and the one place KMS is called.

Every call runs under a deadline (retries included); throttling and transient errors are
retried by botocore's own retry modes with jittered backoff, inside that deadline. A
semaphore per region admits at most the connection pool's size at once, so a burst waits
for a connection *before* its deadline starts instead of timing out in the queue.
"""

from __future__ import annotations

import collections
import logging
import os
from collections.abc import Mapping
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

import aioboto3
import anyio
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from ..errors import ConfigurationError, KMSError, KMSTimeoutError

if TYPE_CHECKING:
    from ..runtime import Runtime

__all__ = ["KmsClients", "KmsSettings"]

log = logging.getLogger("aioenvelope.kms")

_METHODS = {
    "GenerateDataKey": "generate_data_key",
    "Encrypt": "encrypt",
    "Decrypt": "decrypt",
    "DescribeKey": "describe_key",
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


class KmsClients:
    """The KMS clients of one keyring. Opened and closed with the ``EnvelopeClient``.

    A caller-supplied client serves its own region and is never closed here.
    """

    def __init__(self, settings: KmsSettings) -> None:
        self.settings = settings
        self.calls: collections.Counter[str] = collections.Counter()
        self.runtime: Runtime | None = None
        self._clients: dict[str, Any] = {}
        self._gates: dict[str, anyio.Semaphore] = {}
        self._stack: AsyncExitStack | None = None
        self._lock = anyio.Lock()
        self._session = settings.session
        if settings.client is not None:
            region = str(settings.client.meta.region_name)
            self._clients[region] = settings.client
            self._gates[region] = anyio.Semaphore(settings.max_connections)

    async def open(self) -> None:
        self._stack = AsyncExitStack()

    async def close(self) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            # Owned clients only; a supplied one stays in _clients and stays open.
            owned = [r for r, c in self._clients.items() if c is not self.settings.client]
            try:
                await stack.aclose()
            finally:
                for region in owned:
                    self._clients.pop(region, None)
                    self._gates.pop(region, None)

    def region_for(self, key_id: str, arn_region: str | None) -> str:
        region = arn_region or self.settings.default_region()
        if not region:
            raise ConfigurationError(
                f"no AWS region for KMS key {key_id!r}: give a key ARN, region_name, or set "
                "AWS_REGION"
            )
        return region

    async def _client(self, region: str) -> tuple[Any, anyio.Semaphore]:
        client = self._clients.get(region)
        if client is not None:
            return client, self._gates[region]
        async with self._lock:
            if region not in self._clients:
                if self._stack is None:
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
                log.debug("opening a KMS client for region %s", region)
                self._clients[region] = await self._stack.enter_async_context(
                    self._session.client(
                        "kms",
                        region_name=region,
                        endpoint_url=self.settings.endpoint_url,
                        config=config,
                    )
                )
                self._gates[region] = anyio.Semaphore(self.settings.max_connections)
            return self._clients[region], self._gates[region]

    async def call(
        self, operation: str, region: str, key_id: str, params: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Call ``operation`` and return its response, or raise a :class:`KMSError`."""
        breaker = self.runtime.breaker(region) if self.runtime is not None else None
        if breaker is not None:
            breaker.before_call()  # fails fast, with no I/O, while KMS is down
        try:
            response = await self._call(operation, region, key_id, params)
        except KMSError as exc:
            log.log(
                logging.WARNING if exc.transient else logging.INFO,
                "KMS %s with key %s in %s failed: %s",
                operation,
                key_id,
                region,
                exc.error_code,
            )
            if breaker is not None:
                if exc.transient:
                    breaker.record_failure()
                else:
                    breaker.record_success()  # KMS answered (with an error): it is up
            raise
        except BaseException:
            if breaker is not None:
                breaker.record_abandoned()  # cancelled before an answer
            raise
        if breaker is not None:
            breaker.record_success()
        return response

    async def _call(
        self, operation: str, region: str, key_id: str, params: Mapping[str, Any]
    ) -> dict[str, Any]:
        client, gate = await self._client(region)
        method = getattr(client, _METHODS[operation])
        async with gate:
            log.debug("KMS %s with key %s in %s", operation, key_id, region)
            self.calls[operation] += 1
            if self.runtime is not None:
                self.runtime.stats.kms_calls[operation] += 1
            try:
                with anyio.fail_after(self.settings.deadline):
                    response: dict[str, Any] = await method(**params)
            except TimeoutError as exc:
                raise KMSTimeoutError(
                    f"KMS {operation} with key {key_id} did not finish within "
                    f"{self.settings.deadline:g} s (retries included)",
                    operation=operation,
                    key_id=key_id,
                    error_code="Timeout",
                    transient=True,
                ) from exc
            except ClientError as exc:
                raise _from_client_error(exc, operation, key_id) from exc
            except BotoCoreError as exc:
                raise KMSError(
                    f"KMS {operation} with key {key_id} failed: {type(exc).__name__}",
                    operation=operation,
                    key_id=key_id,
                    error_code=type(exc).__name__,
                    transient=True,
                ) from exc
        return response


def _from_client_error(exc: ClientError, operation: str, key_id: str) -> KMSError:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", "Unknown"))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    message = str(error.get("Message", "")).strip()
    transient = code in _TRANSIENT_CODES or status >= 500
    detail = f": {message}" if message else ""
    hint = _HINTS.get(code, "")
    return KMSError(
        f"KMS {operation} with key {key_id} failed with {code}{detail}{hint}",
        operation=operation,
        key_id=key_id,
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
