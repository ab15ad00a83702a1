"""The one place Vault (or OpenBao) is called: JSON over HTTP on one aiohttp session.

Every call runs under one deadline: the wait for a connection, a login and every attempt.
Answers that say nothing about the request (5xx, a sealed server's 503, 429, a standby's
redirect, a refused or dropped connection) are retried with jittered exponential backoff
within that deadline; the others (400, 403, 404) are answers and end the call. The
client's circuit breaker for the server hears of each outage and each answer, as for KMS
(``kms_clients.KmsClients.call``), and nothing of calls cut off by the client's close.
The token comes from the caller, or from an AppRole login kept fresh here.

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

from ...breaker import OPEN, CircuitBreaker
from ...errors import ConfigurationError, VaultError
from ...telemetry import note_attempt
from .._remote import last_of_attempts, log_failure, observe_call, record_verdict
from ._auth import AppRoleAuth

if TYPE_CHECKING:
    import ssl as _ssl

    import aiohttp

    from ...runtime import Runtime

__all__ = ["VaultTransport", "shown_url"]

log = logging.getLogger("aioenvelope.vault")

SERVICE = "Vault"  # what the circuit breaker counts failures of
# Token requests made on the way to a transit call: not attempts of that call.
_AUTH_OPERATIONS = frozenset({"login", "lookup", "renew"})
MAX_CONNECTIONS = 32
_BACKOFF_BASE = 0.05  # seconds before the first retry (at most; full jitter)
_BACKOFF_CAP = 1.0
_MESSAGE_LIMIT = 300  # characters of the server's own error text
_RESPONSE_LIMIT = 1 << 20  # bytes of a response body: transit answers are small
# A failed login is every call's answer for this long (a bad secret ID costs one login
# a second, not one per call).
_LOGIN_FAILURE_KEPT = 1.0
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


class _Login:
    """One login (or renewal), shared by every call that needs a token meanwhile: the
    call that starts it runs it under its own remaining deadline, the others wait for
    its outcome (a lease or an error) instead of trying again one after another."""

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.lease: _Lease | None = None
        self.error: VaultError | None = None


class _Closed(Exception):
    """The transport was closed (the client exited) while a call was under way."""


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
        self.address = urllib.parse.urlsplit(self.shown_url).netloc or None  # telemetry
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
        self._login: _Login | None = None  # the login or renewal under way, if any
        self._failed_login: tuple[VaultError, float] | None = None  # and until when
        self._open = False
        self._epoch = 0  # one more at each close: a call of an earlier epoch was cut off

    def __repr__(self) -> str:
        return f"VaultTransport({self.shown_url!r})"

    async def open(self) -> None:
        if self._open:
            return
        import aiohttp  # a core dependency; imported here so KMS-only users never load it

        self._gate = anyio.Semaphore(MAX_CONNECTIONS)
        if self._supplied is None:
            connector = aiohttp.TCPConnector(limit=MAX_CONNECTIONS)
            self._owned = self._session = aiohttp.ClientSession(connector=connector)
        self._open = True

    async def close(self) -> None:
        if not self._open:
            return
        self._open = False
        self._epoch += 1
        self._lease = None
        self._login = None
        self._failed_login = None
        owned, self._owned = self._owned, None
        self._session = self._supplied
        if owned is not None:
            with anyio.CancelScope(shield=True):  # a half-closed session leaks sockets
                await owned.close()

    def _closed_error(self, operation: str, key_id: str) -> ConfigurationError:
        return ConfigurationError(
            f"the EnvelopeClient was closed while a Vault {operation} with key {key_id} at "
            f"{self.shown_url} was under way: close the client only after its calls finish"
        )

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
        """:meth:`_guarded_call` inside its telemetry watch."""
        with observe_call(self.runtime, VaultError.SERVICE, operation, key_id, self.address):
            return await self._guarded_call(operation, method, path, key_id, body, unwrap=unwrap)

    async def _guarded_call(
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
        a token (an AppRole login or renewal when due, shared with concurrent calls), for
        an unwrap one token of the decrypt rate limit, then the request, retried. One
        deadline covers all of it: the wait for a connection, the login and every
        attempt (not the wait for the client's own decrypt rate limit).
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
        epoch = self._epoch
        deadline_at = anyio.current_time() + self.deadline
        try:
            response = await self._call_with_token(
                operation, method, path, key_id, body, deadline_at, unwrap, breaker
            )
        except VaultError as exc:
            log_failure(log, "Vault", exc, self.address, shown_at=self.shown_url, unwrap=unwrap)
            # Cut off by the close: no verdict.
            record_verdict(breaker, SERVICE, exc, unasked=epoch != self._epoch)
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
        return response

    async def _call_with_token(
        self,
        operation: str,
        method: str,
        path: str,
        key_id: str,
        body: Mapping[str, Any] | None,
        deadline_at: float,
        unwrap: bool,
        breaker: CircuitBreaker | None,
    ) -> dict[str, Any]:
        token = await self._current_token(deadline_at)
        if breaker is not None and breaker.state == OPEN and breaker.refuses():
            breaker.before_call(SERVICE)  # opened while this call waited for a login
        if unwrap and self.runtime is not None:
            waited_from = anyio.current_time()
            await self.runtime.admit_remote_decrypt()  # after the login: spent on a request
            deadline_at += anyio.current_time() - waited_from  # the client's wait, not Vault's
        try:
            payload = await self._request(operation, method, path, key_id, body, token, deadline_at)
        except VaultError as exc:
            if exc.error_code != "PermissionDenied" or not await self._token_was_refused(
                token, deadline_at
            ):
                raise
            log.info("Vault refused the keyring's token (expired or revoked): logging in again")
            token = await self._current_token(deadline_at)
            payload = await self._request(
                operation, method, path, key_id, body, token, deadline_at, count=False
            )
        return _data(payload, operation, key_id)

    # -- tokens ------------------------------------------------------------------------

    async def _current_token(self, deadline_at: float) -> str | None:
        """The token for a request: the fixed one, or the AppRole lease's, after one login
        or renewal shared by every call that needs it meanwhile. A failed login is the
        answer of every call that waited for it, and of those that come within a second
        after it (so a bad secret ID costs one login a second, not one per call)."""
        if self._auth is None:
            return self._token
        epoch = self._epoch
        while True:
            if epoch != self._epoch:
                raise _Closed
            lease = self._lease
            now = time.monotonic()
            if lease is not None and now < lease.refresh_at:
                return lease.token
            failed = self._failed_login
            if failed is not None and now < failed[1]:
                raise _again(
                    failed[0], " (a login that failed under a second ago: not retried yet)"
                )
            attempt = self._login
            if attempt is None:
                return await self._log_in(lease, deadline_at)
            with anyio.move_on_at(deadline_at):
                await attempt.done.wait()
            if not attempt.done.is_set():
                raise self._timeout("login", self._auth.login_path, None, 0)
            if attempt.error is not None:
                raise _again(attempt.error)
            if attempt.lease is not None:
                return attempt.lease.token
            # The call that ran it was cancelled: the next one round runs it.

    async def _log_in(self, old: _Lease | None, deadline_at: float) -> str:
        epoch = self._epoch
        attempt = self._login = _Login()
        try:
            lease = await self._refresh(old, deadline_at)
        except VaultError as exc:
            if epoch == self._epoch:
                attempt.error = exc
                self._failed_login = (exc, time.monotonic() + _LOGIN_FAILURE_KEPT)
            raise
        else:
            if epoch != self._epoch:
                raise _Closed  # never keep a lease on a closed transport
            self._lease = attempt.lease = lease
            self._failed_login = None
            return lease.token
        finally:
            if self._login is attempt:
                self._login = None
            attempt.done.set()

    async def _token_was_refused(self, token: str | None, deadline_at: float) -> bool:
        """After a 403 on ``token``: whether the token itself is dead (expired or revoked),
        so that one login and one retry may help. Vault answers a dead token and a policy
        denial alike, and a message can name any key: so the token is asked about itself
        (``auth/token/lookup-self``, which the default policy allows) before it is thrown
        away, and a live token's 403 is the policy's answer, costing no login."""
        if self._auth is None:
            return False
        lease = self._lease
        if lease is None or lease.token != token:
            return True  # another call has replaced it meanwhile: retry with the new one
        try:
            await self._request(
                "lookup",
                "GET",
                "auth/token/lookup-self",
                self._auth.login_path,
                None,
                token,
                deadline_at,
            )
        except VaultError as exc:
            if exc.error_code != "PermissionDenied":
                raise
            if self._lease is lease:
                self._lease = None  # dead: the next token comes from a login
            return True
        return False

    async def _refresh(self, old: _Lease | None, deadline_at: float) -> _Lease:
        auth = self._auth
        assert auth is not None
        if old is not None and old.renewable and time.monotonic() < old.expires_at:
            try:
                payload = await self._request(
                    "renew",
                    "POST",
                    "auth/token/renew-self",
                    auth.login_path,
                    {},
                    old.token,
                    deadline_at,
                )
                renewed = _lease(payload.get("auth") or {}, time.monotonic())
            except VaultError as exc:
                if exc.error_code == "Timeout":
                    raise  # no time left to log in either
            except ValueError:
                pass  # not renewable after all: log in again
            else:
                if renewed.duration >= old.duration / 2:  # not yet near its max TTL
                    return renewed
        payload = await self._request(
            "login",
            "POST",
            auth.login_path,
            auth.login_path,
            auth.login_body(),
            None,
            deadline_at,
        )
        try:
            return _lease(payload.get("auth") or {}, time.monotonic())
        except ValueError:
            pass
        raise VaultError(
            f"Vault AppRole login at {auth.login_path} ({self.shown_url}) returned no client token",
            operation="login",
            key_id=auth.login_path,
            error_code="InvalidResponse",
            transient=False,
        )

    # -- requests, with retries within the deadline ------------------------------------

    async def _request(
        self,
        operation: str,
        method: str,
        path: str,
        key_id: str,
        body: Mapping[str, Any] | None,
        token: str | None,
        deadline_at: float,
        *,
        count: bool = True,
    ) -> dict[str, Any]:
        assert self._gate is not None
        epoch = self._epoch
        failures = 0
        last: VaultError | None = None
        with anyio.move_on_at(deadline_at):
            async with self._gate:  # a connection slot: its wait is within the deadline
                if count:
                    self.calls[operation] += 1  # counted once sent, not its retries
                while True:
                    if epoch != self._epoch:
                        raise _Closed
                    try:
                        return await self._attempt(operation, method, path, key_id, body, token)
                    except VaultError as exc:
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

    def _timeout(
        self, operation: str, key_id: str, last: VaultError | None, failures: int
    ) -> VaultError:
        said = (
            f"did not finish within {self.deadline:g} s, the call's one deadline (the "
            "wait for a connection, a login and retries included)"
        )
        if last is not None:
            tries = "attempt" if failures == 1 else "attempts"
            said += f": after {failures} failed {tries}, the last with {last.error_code}"
        return VaultError(
            f"Vault {operation} with key {key_id} at {self.shown_url} {said}",
            operation=operation,
            key_id=key_id,
            error_code="Timeout",
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
        if operation not in _AUTH_OPERATIONS:
            note_attempt()  # telemetry counts transit requests sent, retries included
        import aiohttp

        session = self._session
        if session is None or not self._open:
            raise _Closed
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
        # aiohttp's exceptions are never chained to ours, nor raised from inside their
        # handler (which would leave them as __context__): some (ClientResponseError's
        # request_info) hold the request's headers, and so the token.
        failure: str | None = None
        too_big = False
        status = 0
        location = ""
        raw = b""
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
                location = response.headers.get("Location", "")
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.content.iter_chunked(1 << 16):
                    size += len(chunk)
                    if size > _RESPONSE_LIMIT:
                        too_big = True
                        break
                    chunks.append(chunk)
                raw = b"".join(chunks)
        except (aiohttp.ClientError, RuntimeError) as exc:  # RuntimeError: session closed
            failure = _clip(f"{type(exc).__name__}: {exc}").replace(self.url, self.shown_url)
        if failure is not None:
            if not self._open:
                raise _Closed
            raise VaultError(
                f"{where} failed with a connection error ({failure}). Check url= (or "
                "VAULT_ADDR) and the network",
                operation=operation,
                key_id=key_id,
                error_code="ConnectionError",
                transient=True,
            )
        if too_big:
            raise VaultError(
                f"{where} answered with more than {_RESPONSE_LIMIT} bytes",
                operation=operation,
                key_id=key_id,
                error_code="InvalidResponse",
                transient=False,
            )
        try:
            payload = json.loads(raw) if raw else {}
        except (ValueError, RecursionError):  # RecursionError: nested too deep
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
        if status < 400:
            # An HA standby redirects to the active node. Not followed (the token would
            # go wherever Location says): retried, as during a fail-over.
            target = f" to {shown_url(location)}" if location.startswith("http") else ""
            raise VaultError(
                f"{where} was redirected (HTTP {status}){target}: a standby node that does "
                "not forward requests; give url= the active node or a load balancer in "
                "front of the cluster",
                operation=operation,
                key_id=key_id,
                error_code="Redirected",
                transient=True,
            )
        raise _error(where, status, payload, operation, key_id, method, path)


def _again(error: VaultError, note: str = "") -> VaultError:
    """``error`` once more, for another call: a new exception (one raised in several
    tasks would gather all of their tracebacks)."""
    return VaultError(
        str(error) + note,
        operation=error.operation,
        key_id=error.key_id,
        error_code=error.error_code,
        transient=error.transient,
    )


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
