"""The one place Azure Key Vault is called: its REST API through the official client.

Each vault gets one ``azure.keyvault.keys.crypto.aio.CryptographyClient``, made when the
keyring opens and closed when it closes, and every call goes through its public
``send_request``: the client's own pipeline (the 401 bearer challenge, the credential's
tokens, TLS, its transport and logging policy), but always to the service. The client's
``wrap_key`` is not used: for an RSA key it fetches the public key and wraps **locally**
(so neither the wrapKey permission nor a disabled key is ever checked on encrypt), and
for an ``oct-HSM`` key, whose fetched JWK holds no key bytes, it wraps locally under a
random key that nobody can unwrap later.

Every call runs under one deadline, retries included: the SDK's retry policy is turned
off (``retry_total=0``; its own retries of a POST ignore a per-call ``timeout=``), each
attempt's ``read_timeout`` is what is left, and the whole call is cancelled at the
deadline. 408, 429, 5xx and network failures are retried with jittered backoff (a
``Retry-After`` that fits in the deadline is honoured); the others are answers. The
client's circuit breaker for the vault (``"azure-kv <vault URL>"``) hears of each outage
and each answer, as for KMS and Vault. The SDK's exceptions are never chained to ours:
an ``HttpResponseError`` holds the request, and so its ``Authorization`` header.
"""

from __future__ import annotations

import collections
import json
import logging
import random
import urllib.parse
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import anyio

from ...errors import AzureKeyVaultError, ConfigurationError
from ...telemetry import note_attempt
from .._remote import last_of_attempts, log_failure, observe_call, record_verdict

if TYPE_CHECKING:
    from azure.core.credentials_async import AsyncTokenCredential

    from ...runtime import Runtime

__all__ = ["AzureTransport", "clip"]

log = logging.getLogger("aioenvelope.azure")

SERVICE = "Azure Key Vault"  # what the circuit breaker counts failures of
_BACKOFF_BASE = 0.05  # seconds before the first retry (at most; full jitter)
_BACKOFF_CAP = 1.0
_MESSAGE_LIMIT = 300  # characters of the service's own error text
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# Answers that are about the caller's identity, not about a key: no other EDK helps.
AUTH_CODES = frozenset({"CredentialUnavailable", "ChallengeRejected", "Unauthorized"})


def clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MESSAGE_LIMIT else text[:_MESSAGE_LIMIT] + "..."


class _Closed(Exception):
    """The transport was closed (the client exited) while a call was under way."""


class AzureTransport:
    """Calls to the vaults of one keyring; opened and closed with it."""

    def __init__(
        self,
        *,
        vaults: Mapping[str, str],
        credential: AsyncTokenCredential | None,
        client_options: Mapping[str, Any],
        deadline: float,
        max_attempts: int,
    ) -> None:
        #: vault URL -> a key URL in it (what the vault's CryptographyClient is made with)
        self._vaults = dict(vaults)
        self._credential = credential
        self._owned_credential: Any = None
        self._options = dict(client_options)
        self.deadline = deadline
        self.max_attempts = max_attempts
        self.calls: collections.Counter[str] = collections.Counter()
        self.runtime: Runtime | None = None
        self._clients: dict[str, Any] = {}
        self._open = False
        self._epoch = 0  # one more at each close: a call of an earlier epoch was cut off

    def __repr__(self) -> str:
        return f"AzureTransport({sorted(self._vaults)!r})"

    @staticmethod
    def breaker_name(vault_url: str) -> str:
        return f"azure-kv {vault_url}"

    async def open(self) -> None:
        if self._open:
            return
        try:
            from azure.keyvault.keys.crypto.aio import CryptographyClient
        except ImportError:
            raise ConfigurationError(
                "the Azure Key Vault keyring needs azure-keyvault-keys and azure-identity: "
                "pip install 'aioenvelope[azure]'"
            ) from None
        credential = self._credential
        if credential is None:
            try:
                from azure.identity.aio import DefaultAzureCredential
            except ImportError:
                raise ConfigurationError(
                    "no credential= given and azure-identity is not installed: pip install "
                    "'aioenvelope[azure]', or pass an async credential"
                ) from None
            credential = self._owned_credential = DefaultAzureCredential()
        options = {**self._options, "retry_total": 0}  # retries are ours, within the deadline
        transport = options.get("transport")
        if transport is not None and not all(
            callable(getattr(transport, name, None)) for name in ("send", "__aenter__", "__aexit__")
        ):
            await self._close_owned()
            raise ConfigurationError(
                "client_options['transport'] must be an azure-core async transport (an "
                "AsyncHttpTransport such as azure.core.pipeline.transport.AioHttpTransport), "
                f"not {type(transport).__name__}"
            )
        try:
            for vault_url, key_url in self._vaults.items():
                self._clients[vault_url] = CryptographyClient(key_url, credential, **options)
        except Exception as exc:  # what the SDK makes of an option it refuses
            said = f"{type(exc).__name__}: {clip(str(exc))}"
        else:
            self._open = True
            return
        clients, self._clients = self._clients, {}
        await self._close_all(clients)
        await self._close_owned()
        raise ConfigurationError(
            f"client_options were refused by the Key Vault CryptographyClient ({said}); "
            "check each option's name and value"
        )

    async def _close_owned(self) -> None:
        owned, self._owned_credential = self._owned_credential, None
        if owned is not None:
            with anyio.CancelScope(shield=True):
                await owned.close()  # a caller's credential is theirs to close

    @staticmethod
    async def _close_all(clients: Mapping[str, Any]) -> str | None:
        """Close each client; what went wrong with the first that would not close."""
        failed: str | None = None
        with anyio.CancelScope(shield=True):  # a half-closed session leaks sockets
            for client in clients.values():
                try:
                    await client.close()
                except Exception as exc:  # close the others regardless
                    failed = failed or f"{type(exc).__name__}: {clip(str(exc))}"
        return failed

    async def close(self) -> None:
        if not self._open:
            return
        self._open = False
        self._epoch += 1
        clients, self._clients = self._clients, {}
        failed = await self._close_all(clients)
        await self._close_owned()
        if failed is not None:
            raise ConfigurationError(
                f"closing the Key Vault CryptographyClient failed ({failed}); check "
                "client_options (a 'transport' must be an azure-core async transport)"
            )

    def _closed_error(self, operation: str, key_id: str) -> ConfigurationError:
        return ConfigurationError(
            f"the EnvelopeClient was closed while an Azure Key Vault {operation} with key "
            f"{key_id} was under way: close the client only after its calls finish"
        )

    # -- one call ----------------------------------------------------------------------

    async def call(
        self,
        operation: str,
        method: str,
        vault_url: str,
        path: str,
        key_id: str,
        body: Mapping[str, Any] | None = None,
        *,
        unwrap: bool = False,
    ) -> dict[str, Any]:
        """:meth:`_guarded_call` inside its telemetry watch."""
        host = urllib.parse.urlsplit(vault_url).netloc or None
        with observe_call(self.runtime, AzureKeyVaultError.SERVICE, operation, key_id, host):
            return await self._guarded_call(
                operation, method, vault_url, path, key_id, body, unwrap=unwrap
            )

    async def _guarded_call(
        self,
        operation: str,
        method: str,
        vault_url: str,
        path: str,
        key_id: str,
        body: Mapping[str, Any] | None = None,
        *,
        unwrap: bool = False,
    ) -> dict[str, Any]:
        """Send ``method path`` to ``vault_url`` and return the JSON answer, or raise
        :class:`AzureKeyVaultError`. In order: the vault's breaker (fails fast while it
        is down), for an unwrap one token of the decrypt rate limit, then the request,
        retried, all within one deadline (not counting the wait for the rate limit)."""
        if not self._open:
            raise ConfigurationError(
                "the Azure Key Vault keyring is not open: use it inside "
                "`async with EnvelopeClient(...)`"
            )
        runtime = self.runtime
        breaker = runtime.breaker(self.breaker_name(vault_url)) if runtime is not None else None
        if breaker is not None:
            breaker.before_call(SERVICE)
        epoch = self._epoch
        try:
            deadline_at = anyio.current_time() + self.deadline
            if unwrap and runtime is not None:
                await runtime.admit_remote_decrypt()
                deadline_at = anyio.current_time() + self.deadline  # the client's wait, not Azure's
            answer = await self._request(
                operation, method, vault_url, path, key_id, body, deadline_at
            )
        except AzureKeyVaultError as exc:
            log_failure(
                log,
                "Azure Key Vault",
                exc,
                urllib.parse.urlsplit(vault_url).netloc,
                unwrap=unwrap,
            )
            record_verdict(
                breaker,
                SERVICE,
                exc,
                # cut off by the close, or never reached the vault: no verdict
                unasked=epoch != self._epoch
                or exc.error_code in ("CredentialUnavailable", "ChallengeRejected"),
            )
            raise
        except _Closed:
            if breaker is not None:
                breaker.record_abandoned()
            raise self._closed_error(operation, key_id) from None
        except BaseException:
            if breaker is not None:
                breaker.record_abandoned()  # cancelled, rate-limited, not sent: no verdict
            raise
        record_verdict(breaker, SERVICE, None, unasked=epoch != self._epoch)
        return answer

    async def _request(
        self,
        operation: str,
        method: str,
        vault_url: str,
        path: str,
        key_id: str,
        body: Mapping[str, Any] | None,
        deadline_at: float,
    ) -> dict[str, Any]:
        epoch = self._epoch
        failures = 0
        last: AzureKeyVaultError | None = None
        self.calls[operation] += 1  # counted once sent, not its retries
        with anyio.move_on_at(deadline_at):
            while True:
                if epoch != self._epoch:
                    raise _Closed
                retry_after = 0.0
                try:
                    return await self._attempt(
                        operation, method, vault_url, path, key_id, body, deadline_at
                    )
                except _Retryable as exc:
                    if epoch != self._epoch:
                        raise _Closed from None
                    failures += 1
                    last, retry_after = exc.error, exc.retry_after
                if failures >= self.max_attempts:
                    raise last_of_attempts(last, failures)
                delay = random.uniform(0, min(_BACKOFF_CAP, _BACKOFF_BASE * 2**failures))  # noqa: S311 - jitter, not a secret
                delay = max(delay, retry_after)
                if anyio.current_time() + delay >= deadline_at:
                    raise last_of_attempts(last, failures)
                await anyio.sleep(delay)
        if epoch != self._epoch:
            raise _Closed
        said = (
            f"did not finish within {self.deadline:g} s, the call's one deadline (retries included)"
        )
        if last is not None:
            tries = "attempt" if failures == 1 else "attempts"
            said += f": after {failures} failed {tries}, the last with {last.error_code}"
        raise AzureKeyVaultError(
            f"Azure Key Vault {operation} with key {key_id} {said}",
            operation=operation,
            key_id=key_id,
            error_code="Timeout",
            transient=True,
        )

    async def _attempt(
        self,
        operation: str,
        method: str,
        vault_url: str,
        path: str,
        key_id: str,
        body: Mapping[str, Any] | None,
        deadline_at: float,
    ) -> dict[str, Any]:
        from azure.core.exceptions import (
            ClientAuthenticationError,
            HttpResponseError,
            IncompleteReadError,
            ServiceRequestError,
            ServiceResponseError,
        )
        from azure.core.rest import HttpRequest

        client = self._clients.get(vault_url)
        if client is None or not self._open:
            raise _Closed
        where = f"Azure Key Vault {operation} with key {key_id}"
        remaining = max(deadline_at - anyio.current_time(), 0.001)
        request = HttpRequest(method, path, json=dict(body) if body is not None else None)
        failure: tuple[str, str, bool] | None = None  # (code, text, transient)
        response: Any = None
        note_attempt()  # telemetry counts what is sent, retries included
        try:
            response = await client.send_request(
                request, connection_timeout=remaining, read_timeout=remaining
            )
        except ClientAuthenticationError as exc:
            failure = (
                "CredentialUnavailable",
                f"no token from the credential ({type(exc).__name__}: {clip(str(exc))}); "
                "check credential= (by default azure-identity's DefaultAzureCredential: "
                "environment variables, workload or managed identity, Azure CLI login)",
                False,
            )
        except (ServiceRequestError, ServiceResponseError) as exc:
            failure = (
                "ConnectionError",
                f"a connection error ({type(exc).__name__}: {clip(str(exc))}); check the "
                "vault URL and the network",
                True,
            )
        except IncompleteReadError as exc:  # the connection was cut within the body
            failure = (
                "ConnectionError",
                f"a connection error ({type(exc).__name__}: the answer was cut off); check "
                "the vault URL and the network",
                True,
            )
        except HttpResponseError as exc:
            # Raised by the pipeline itself, not a status: a body that does not parse as
            # its Content-Type says (DecodeError), too many redirects... Not Key Vault
            # answering: transient, retried, a failure for the breaker. Its own text is
            # not kept (it may quote the body: an unwrapkey answer holds a data key).
            failure = (
                "InvalidResponse",
                f"an answer that is not Key Vault's ({type(exc).__name__}, HTTP "
                f"{_status_of(exc)}); a gateway or proxy in the way?",
                True,
            )
        except ValueError as exc:  # the challenge policy refused the 401's resource
            failure = (
                "ChallengeRejected",
                f"the vault's authentication challenge was refused ({clip(str(exc))}); "
                "a vault outside *.vault.azure.net or *.managedhsm.azure.net needs "
                "client_options={'verify_challenge_resource': False}",
                False,
            )
        if failure is not None:
            if not self._open:
                raise _Closed
            code, text, transient = failure
            error = AzureKeyVaultError(
                f"{where} failed with {text}",
                operation=operation,
                key_id=key_id,
                error_code=code,
                transient=transient,
            )
            if transient:
                raise _Retryable(error, 0.0)
            raise error
        status = int(response.status_code)
        try:
            payload = json.loads(response.content) if response.content else {}
        except (ValueError, RecursionError):
            payload = None
        if not isinstance(payload, dict):
            payload = {}
            if status < 300:
                raise AzureKeyVaultError(
                    f"{where} answered {status} with a body that is not a JSON object",
                    operation=operation,
                    key_id=key_id,
                    error_code="InvalidResponse",
                    transient=False,
                )
        if status < 300:
            return payload
        error = _error(where, status, payload, operation, key_id)
        if error.transient:
            raise _Retryable(error, _retry_after(response.headers.get("Retry-After")))
        raise error


def _status_of(exc: Any) -> str:
    status = getattr(exc, "status_code", None)
    return str(status) if isinstance(status, int) else "status unknown"


class _Retryable(Exception):
    def __init__(self, error: AzureKeyVaultError, retry_after: float) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after


def _retry_after(value: str | None) -> float:
    """A ``Retry-After`` in seconds (Key Vault sends seconds), 0 if absent or not one."""
    try:
        seconds = float(value) if value else 0.0
    except ValueError:
        return 0.0
    return seconds if 0 < seconds < 3600 else 0.0


def _error(
    where: str, status: int, payload: Mapping[str, Any], operation: str, key_id: str
) -> AzureKeyVaultError:
    """The library error for an error answer: Key Vault's code and words, and what to do."""
    said = payload.get("error")
    said = said if isinstance(said, dict) else {}
    raw_code = said.get("code")
    code = (
        raw_code if isinstance(raw_code, str) and raw_code.isalnum() and len(raw_code) < 64 else ""
    )
    inner = said.get("innererror")
    inner_code = inner.get("code") if isinstance(inner, dict) else None
    text = clip(str(said.get("message") or ""))
    lowered = text.lower()
    transient = status in _TRANSIENT_STATUS
    permission = {"wrapkey": "wrapKey", "unwrapkey": "unwrapKey", "get": "get"}.get(
        operation, operation
    )
    if status == 401:
        code = code or "Unauthorized"
        hint = (
            "the vault refused the credential's token: check the credential's tenant and "
            "that the vault is in it"
        )
    elif status == 403 and ("disabled" in lowered or inner_code == "KeyDisabled"):
        code = code or "Forbidden"
        hint = "the key (this version of it) is disabled: enable it, or use another key"
    elif status == 403:
        code = code or "Forbidden"
        hint = (
            f"the credential needs the keys/{permission} permission on this key (the RBAC "
            "role 'Key Vault Crypto Service Encryption User', or an access policy), and the "
            "vault's firewall must let this client in"
        )
    elif status == 404:
        code = code or "NotFound"
        hint = "no such key or key version in this vault: check the key URL"
    elif status == 429:
        code = code or "Throttled"
        hint = "Key Vault's request limits; retry later"
    elif status >= 500 or transient:
        code = code or "ServerError"
        hint = "the service failed; retry later"
    elif operation == "unwrapkey" and status == 400:
        code = code or "BadParameter"
        hint = (
            "the encrypted data key does not unwrap under this key version with this "
            "algorithm: it was made under another key or algorithm, or altered"
        )
    else:
        code = code or "InvalidRequest"
        hint = ""
    words = f" {code}: {text}" if text else f" {code}"
    return AzureKeyVaultError(
        f"{where} failed with HTTP {status}{words}" + (f" ({hint})" if hint else ""),
        operation=operation,
        key_id=key_id,
        error_code=code,
        transient=transient,
    )
