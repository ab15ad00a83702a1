"""The one place Vault (or OpenBao) is called: JSON over HTTP on one aiohttp session.

Every call runs under a deadline (retries included). Answers that say nothing about the
request (5xx, a sealed server's 503, 429, a refused or dropped connection) are retried
with jittered exponential backoff within that deadline; the others (400, 403, 404) are
answers and end the call. The client's circuit breaker for the server hears of each
outage and each answer, as for KMS (``kms_clients.KmsClients.call``). The token comes
from the caller, or from an AppRole login kept fresh here.

aiohttp is imported when the keyring opens, so ``import aioenvelope`` works without it.
"""

from __future__ import annotations

import collections
import json
import logging
import random
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from ...errors import ConfigurationError, VaultError
from ._auth import AppRoleAuth

if TYPE_CHECKING:
    import ssl as _ssl

    import aiohttp

    from ...runtime import Runtime

__all__ = ["VaultTransport", "shown_url"]

log = logging.getLogger("aioenvelope.vault")

SERVICE = "Vault"  # what the circuit breaker counts failures of
MAX_CONNECTIONS = 32
_BACKOFF_BASE = 0.05  # seconds before the first retry (at most; full jitter)
_BACKOFF_CAP = 1.0
_MESSAGE_LIMIT = 300  # characters of the server's own error text
_RESPONSE_LIMIT = 1 << 20  # bytes of a response body: transit answers are small
# A token in use this long, refused with 403, may have expired or been revoked: one
# login and one retry. Younger, the 403 is the policy's (and logging in again would not
# help): no login, so a denied call costs at most one login a second.
_RELOGIN_MIN_AGE = 1.0
_RENEW_AT = 2 / 3  # of a lease, when the token is renewed (or replaced)


def shown_url(url: str) -> str:
    """``url`` without any user:password part, for names, reprs and errors."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port is not None else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MESSAGE_LIMIT else text[:_MESSAGE_LIMIT] + "..."


@dataclass
class _Lease:
    token: str
    obtained_at: float
    refresh_at: float  # monotonic time: renew or replace from then on
    expires_at: float
    renewable: bool
    duration: float

    def __repr__(self) -> str:
        return f"_Lease(duration={self.duration})"


def _lease(auth: Mapping[str, Any], now: float) -> _Lease:
    token = auth.get("client_token")
    duration = auth.get("lease_duration", 0)
    if not isinstance(token, str) or not token or not isinstance(duration, (int, float)):
        raise ValueError("no client_token")
    if duration <= 0:  # a token that does not expire (a root token's, say)
        return _Lease(token, now, float("inf"), float("inf"), False, 0.0)
    return _Lease(
        token,
        now,
        now + duration * _RENEW_AT,
        now + duration,
        bool(auth.get("renewable", False)),
        float(duration),
    )


class VaultTransport:
    """Calls to one Vault server for one keyring; opened and closed with it."""

    def __init__(
        self,
        *,
        url: str,
        token: str | None,
        auth: AppRoleAuth | None,
        namespace: str | None,
        session: aiohttp.ClientSession | None,
        ssl: _ssl.SSLContext | bool | None,
        deadline: float,
        max_attempts: int,
    ) -> None:
        self.url = url.rstrip("/")
        self.shown_url = shown_url(self.url)
        #: The circuit breaker's name (``client.stats.breaker_states``): one per server.
        self.breaker_name = f"vault {self.shown_url}"
        self.deadline = deadline
        self.max_attempts = max_attempts
        self.calls: collections.Counter[str] = collections.Counter()
        self.runtime: Runtime | None = None
        self._token = token
        self._auth = auth
        self._namespace = namespace
        self._ssl = ssl
        self._supplied = session
        self._session: aiohttp.ClientSession | None = session
        self._owned: aiohttp.ClientSession | None = None
        self._gate: anyio.Semaphore | None = None
        self._lease: _Lease | None = None
        self._login_lock: anyio.Lock | None = None
        self._open = False

    def __repr__(self) -> str:
        return f"VaultTransport({self.shown_url!r})"

    async def open(self) -> None:
        if self._open:
            return
        import aiohttp  # a core dependency; imported here so KMS-only users never load it

        self._gate = anyio.Semaphore(MAX_CONNECTIONS)
        self._login_lock = anyio.Lock()
        if self._supplied is None:
            connector = aiohttp.TCPConnector(limit=MAX_CONNECTIONS)
            self._owned = self._session = aiohttp.ClientSession(connector=connector)
        self._open = True

    async def close(self) -> None:
        if not self._open:
            return
        self._open = False
        self._lease = None
        owned, self._owned = self._owned, None
        self._session = self._supplied
        if owned is not None:
            with anyio.CancelScope(shield=True):  # a half-closed session leaks sockets
                await owned.close()

    # -- one call ----------------------------------------------------------------------

    async def call(
        self,
        operation: str,
        method: str,
        path: str,
        key_id: str,
        body: Mapping[str, Any] | None = None,
        *,
        unwrap: bool = False,
    ) -> dict[str, Any]:
        """Call ``method path`` and return the response's ``data``, or raise
        :class:`VaultError`.

        In order: the server's breaker (fails fast, costing nothing, while it is down),
        for an unwrap one token of the decrypt rate limit, a token (an AppRole login or
        renewal when due), then the request, retried within the deadline.
        """
        if not self._open:
            raise ConfigurationError(
                "the Vault transit keyring is not open: use it inside "
                "`async with EnvelopeClient(...)`"
            )
        runtime = self.runtime
        breaker = runtime.breaker(self.breaker_name) if runtime is not None else None
        if breaker is not None:
            breaker.before_call(SERVICE)
        try:
            if unwrap and runtime is not None:
                await runtime.admit_remote_decrypt()
        except BaseException:
            if breaker is not None:
                breaker.record_abandoned()  # Vault was not asked: no verdict on it
            raise
        self.calls[operation] += 1
        try:
            response = await self._call_with_token(operation, method, path, key_id, body)
        except VaultError as exc:
            log.log(
                logging.WARNING if exc.transient else logging.INFO,
                "Vault %s with key %s at %s failed: %s",
                operation,
                key_id,
                self.shown_url,
                exc.error_code,
            )
            if breaker is not None:
                if exc.transient:
                    breaker.record_failure(SERVICE)
                else:
                    breaker.record_success(SERVICE)  # answered (with an error): it is up
            raise
        except BaseException:
            if breaker is not None:
                breaker.record_abandoned()  # cancelled before an answer
            raise
        if breaker is not None:
            breaker.record_success(SERVICE)
        return response

    async def _call_with_token(
        self,
        operation: str,
        method: str,
        path: str,
        key_id: str,
        body: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        token = await self._current_token()
        try:
            payload = await self._request(operation, method, path, key_id, body, token)
        except VaultError as exc:
            if exc.error_code != "PermissionDenied" or not self._may_log_in_again(token):
                raise
            log.info("Vault refused a token in use for a while: logging in again, once")
            token = await self._current_token()
            payload = await self._request(operation, method, path, key_id, body, token)
        return _data(payload, operation, key_id)

    # -- tokens ------------------------------------------------------------------------

    async def _current_token(self) -> str | None:
        if self._auth is None:
            return self._token
        lease = self._lease
        if lease is None or time.monotonic() >= lease.refresh_at:
            assert self._login_lock is not None
            async with self._login_lock:  # one login or renewal for every waiting call
                lease = self._lease
                if lease is None or time.monotonic() >= lease.refresh_at:
                    lease = self._lease = await self._refresh(lease)
        return lease.token

    def _may_log_in_again(self, token: str | None) -> bool:
        """After a 403 on ``token``: whether to log in again (once) and retry."""
        if self._auth is None:
            return False
        lease = self._lease
        if lease is None or lease.token != token:
            return True  # another call has replaced it meanwhile: retry with the new one
        if time.monotonic() - lease.obtained_at < _RELOGIN_MIN_AGE:
            return False
        lease.refresh_at = 0.0  # log in again: a refused token is not renewed
        lease.renewable = False
        return True

    async def _refresh(self, old: _Lease | None) -> _Lease:
        auth = self._auth
        assert auth is not None
        if old is not None and old.renewable and time.monotonic() < old.expires_at:
            self.calls["renew"] += 1
            try:
                payload = await self._request(
                    "renew", "POST", "auth/token/renew-self", auth.login_path, {}, old.token
                )
                renewed = _lease(payload.get("auth") or {}, time.monotonic())
            except (VaultError, ValueError):
                pass  # expired, revoked or not renewable after all: log in again
            else:
                if renewed.duration >= old.duration / 2:  # not yet near its max TTL
                    return renewed
        self.calls["login"] += 1
        payload = await self._request(
            "login", "POST", auth.login_path, auth.login_path, auth.login_body(), None
        )
        try:
            return _lease(payload.get("auth") or {}, time.monotonic())
        except ValueError:
            raise VaultError(
                f"Vault AppRole login at {auth.login_path} ({self.shown_url}) returned no "
                "client token",
                operation="login",
                key_id=auth.login_path,
                error_code="InvalidResponse",
                transient=False,
            ) from None

    # -- requests, with retries within the deadline ------------------------------------

    async def _request(
        self,
        operation: str,
        method: str,
        path: str,
        key_id: str,
        body: Mapping[str, Any] | None,
        token: str | None,
    ) -> dict[str, Any]:
        assert self._gate is not None
        async with self._gate:  # a connection first, then the deadline starts
            started = anyio.current_time()
            failures = 0
            last: VaultError | None = None
            try:
                with anyio.fail_after(self.deadline):
                    while True:
                        try:
                            return await self._attempt(operation, method, path, key_id, body, token)
                        except VaultError as exc:
                            if not exc.transient:
                                raise
                            failures += 1
                            last = exc
                        if failures >= self.max_attempts:
                            raise self._spent(last, failures) from last
                        delay = random.uniform(0, min(_BACKOFF_CAP, _BACKOFF_BASE * 2**failures))  # noqa: S311 - jitter, not a secret
                        if anyio.current_time() + delay - started >= self.deadline:
                            raise self._spent(last, failures) from last
                        await anyio.sleep(delay)
            except TimeoutError as exc:
                said = f"did not finish within {self.deadline:g} s (retries included)"
                if last is not None:
                    tries = "attempt" if failures == 1 else "attempts"
                    said += f": after {failures} failed {tries}, the last with {last.error_code}"
                raise VaultError(
                    f"Vault {operation} with key {key_id} at {self.shown_url} {said}",
                    operation=operation,
                    key_id=key_id,
                    error_code="Timeout",
                    transient=True,
                ) from (last or exc)

    @staticmethod
    def _spent(last: VaultError | None, failures: int) -> VaultError:
        assert last is not None
        if failures == 1:
            return last
        return VaultError(
            f"{last} (the last of {failures} attempts)",
            operation=last.operation,
            key_id=last.key_id,
            error_code=last.error_code,
            transient=True,
        )

    async def _attempt(
        self,
        operation: str,
        method: str,
        path: str,
        key_id: str,
        body: Mapping[str, Any] | None,
        token: str | None,
    ) -> dict[str, Any]:
        import aiohttp

        session = self._session
        assert session is not None
        headers = {}
        if token is not None:
            headers["X-Vault-Token"] = token
        if self._namespace:
            headers["X-Vault-Namespace"] = self._namespace
        options: dict[str, Any] = {}
        if self._ssl is not None:
            options["ssl"] = self._ssl
        where = f"Vault {operation} with key {key_id} at {self.shown_url}"
        log.debug("Vault %s with key %s at %s", operation, key_id, self.shown_url)
        try:
            async with session.request(
                method,
                f"{self.url}/v1/{path}",
                json=body if method != "GET" else None,
                headers=headers,
                allow_redirects=False,
                **options,
            ) as response:
                status = response.status
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.content.iter_chunked(1 << 16):
                    size += len(chunk)
                    if size > _RESPONSE_LIMIT:
                        raise VaultError(
                            f"{where} answered with more than {_RESPONSE_LIMIT} bytes",
                            operation=operation,
                            key_id=key_id,
                            error_code="InvalidResponse",
                            transient=False,
                        )
                    chunks.append(chunk)
                raw = b"".join(chunks)
        except aiohttp.ClientError as exc:
            detail = _clip(f"{type(exc).__name__}: {exc}")
            raise VaultError(
                f"{where} failed with a connection error ({detail}). Check url= (or "
                "VAULT_ADDR) and the network",
                operation=operation,
                key_id=key_id,
                error_code="ConnectionError",
                transient=True,
            ) from exc
        try:
            payload = json.loads(raw) if raw else {}
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            payload = {}
            if status < 300:
                raise VaultError(
                    f"{where} answered {status} with a body that is not a JSON object",
                    operation=operation,
                    key_id=key_id,
                    error_code="InvalidResponse",
                    transient=False,
                )
        if status < 300:
            return payload
        raise _error(where, status, payload, operation, key_id, method, path)


def _data(payload: Mapping[str, Any], operation: str, key_id: str) -> dict[str, Any]:
    data = payload.get("data")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise VaultError(
            f"Vault {operation} with key {key_id} answered with no data object",
            operation=operation,
            key_id=key_id,
            error_code="InvalidResponse",
            transient=False,
        )
    return data


def _error(
    where: str,
    status: int,
    payload: Mapping[str, Any],
    operation: str,
    key_id: str,
    method: str,
    path: str,
) -> VaultError:
    """The library error for an error answer: a code from a small vocabulary, the
    server's own words, and what to do."""
    said = payload.get("errors")
    texts = [str(e) for e in said if e] if isinstance(said, list) else []
    text = _clip("; ".join(texts)) if texts else ""
    lowered = text.lower()
    transient = status == 429 or status >= 500
    if status == 403:
        capability = "read" if method == "GET" else "update"
        code = "PermissionDenied"
        hint = (
            f"the token's policies must grant '{capability}' on {path}, and the token must "
            "be valid (not expired or revoked)"
        )
    elif status == 429:
        code, hint = "RateLimited", "a rate-limit quota of the server; retry later"
    elif status == 503 and "sealed" in lowered:
        code, hint = "Sealed", "the server is sealed: unseal it"
    elif status >= 500:
        code, hint = "ServerError", "the server failed; retry later"
    elif "message authentication failed" in lowered:
        code = "NotAuthentic"
        hint = (
            "the encrypted data key does not open under this key with this encryption "
            "context: it was made under another key or for another context, or altered"
        )
    elif "too old" in lowered:
        code = "CiphertextTooOld"
        hint = (
            "the data key was wrapped under a key version below the key's "
            "min_decryption_version: re-encrypt such messages (client.reencrypt to the "
            "same keyring) before raising it, or lower it to open this one"
        )
    elif "encryption key not found" in lowered:
        code, hint = "KeyNotFound", "no transit key of that name on this mount"
    elif "invalid ciphertext" in lowered:
        code, hint = "InvalidCiphertext", "the encrypted data key is not a transit ciphertext"
    elif status == 404:
        code = "NotFound"
        hint = "no such path on the server: check mount= and the key name"
    else:
        code, hint = "InvalidRequest", ""
    words = f": {text}" if text else ""
    return VaultError(
        f"{where} failed with HTTP {status}{words}" + (f" ({hint})" if hint else ""),
        operation=operation,
        key_id=key_id,
        error_code=code,
        transient=transient,
    )
