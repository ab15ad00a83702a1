"""What the web integrations answer for the library's errors, and the log line they
write, framework-free, so the Starlette and aiohttp integrations cannot drift apart.

Three kinds of failure, told apart by what the HTTP client can do about them:

- **Try again later** (the request was fine, the key service was not): 429 for a spent
  decrypt rate limit, 503 for an open circuit breaker or a transient key-service
  failure, each with ``Retry-After``.
- **The message cannot be opened as asked** (409, 422): the same request fails the same
  way however often it is repeated, because the ciphertext (sent by the client or read
  from storage) is what it is. A 4xx tells clients, SDK retry policies and load
  balancers' outlier detection not to retry and not to blame the server instance: a
  corrupt object is not a sick server, and every retry of a tampered message would cost
  another KMS Decrypt. Whoever must act is the operator, who gets the log line.
- **The server is misconfigured** (500): a key service refused (access denied, a
  disabled key) or the branch key store cannot serve; the body is generic, the details
  (key ARNs, table names) go to the log.

Bodies carry a fixed code, never the exception's text, an encryption context or key
material. Every answer except the two load-shedding ones (429, the open breaker's 503,
which come in floods and are counted in ``client.stats``) is logged once, at WARNING, on
the ``aioenvelope.integrations`` logger: a line an operator can alert on.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from ..errors import (
    AuthenticationError,
    BranchKeyStoreError,
    CircuitOpenError,
    CommitmentPolicyError,
    EncryptionContextMismatchError,
    KeyServiceError,
    KMSDecryptRateLimited,
    MalformedMessageError,
    MessageLimitError,
    NoUsableKeyError,
    SignedStreamRefusedError,
    TruncatedMessageError,
)

__all__ = [
    "ANSWERED",
    "KEY_SERVICE_RETRY_AFTER",
    "Answer",
    "answer_for",
    "log",
    "log_answered",
    "log_cut_off",
]

log = logging.getLogger("aioenvelope.integrations")

KEY_SERVICE_RETRY_AFTER = 2
"""Seconds a transient key-service failure asks clients to wait. Short: the keyring has
already retried within its deadline, so this only spreads the next attempts out; a real
outage soon opens the circuit breaker, whose 503 carries its own, longer wait."""

_MAX_LOGGED = 2000  # characters of an error's text in a log line


@dataclass(frozen=True)
class Answer:
    """An HTTP answer: status, JSON body, headers, and whether it is logged."""

    status: int
    body: dict[str, object]
    headers: dict[str, str] = field(default_factory=dict)
    logged: bool = True

    @property
    def code(self) -> str:
        return str(self.body["error"])


# Per-message refusals, most specific class first (the first isinstance match wins).
_REFUSALS: tuple[tuple[type[Exception], int, str], ...] = (
    # Intact and authentic, but bound to another context than the request names: a blob
    # copied to another row, an object renamed. The stored state conflicts with the
    # request's address; putting the object back (or asking for the right one) resolves
    # it. Apps whose context encodes ownership (a tenant) should catch it in the handler
    # and answer 404 instead, so the answer does not confirm that the object exists.
    (EncryptionContextMismatchError, 409, "encryption_context_mismatch"),
    # The bytes themselves are bad: nobody can open them, whatever the request says.
    (AuthenticationError, 422, "message_not_authentic"),
    (TruncatedMessageError, 422, "message_truncated"),
    (MessageLimitError, 422, "message_limit_exceeded"),
    (MalformedMessageError, 422, "malformed_message"),
    # A message this server refuses to read: a legacy non-committing suite under the
    # default policy, a signed message where the endpoint streams only unsigned ones.
    (CommitmentPolicyError, 422, "algorithm_suite_not_allowed"),
    (SignedStreamRefusedError, 422, "signed_message_refused"),
    # None of the message's encrypted data keys opens with this server's keys: written
    # under another key, or a required context pair differs. (A KmsKeyring folds KMS's
    # refusals of a data key into this error too, since a message may carry keys it is
    # not meant to open; the log line gives KMS's reason.)
    (NoUsableKeyError, 422, "no_usable_key"),
    # The branch key store cannot serve: a missing table or branch key, or an item that
    # is not what a key store wrote. A server-side fault for the operator.
    (BranchKeyStoreError, 500, "key_store_error"),
)

ANSWERED: tuple[type[Exception], ...] = (
    KMSDecryptRateLimited,
    CircuitOpenError,
    KeyServiceError,
    EncryptionContextMismatchError,
    AuthenticationError,
    MalformedMessageError,
    CommitmentPolicyError,
    SignedStreamRefusedError,
    NoUsableKeyError,
    BranchKeyStoreError,
)
"""The exception classes :func:`answer_for` answers, with their subclasses; roots only,
so that a Starlette app's own handler for ``MalformedMessageError`` also covers
``TruncatedMessageError`` (Starlette looks handlers up along the exception's MRO)."""


def _whole_seconds(delay: float) -> int:
    """``Retry-After`` takes whole seconds: rounded up (never invite a retry too early),
    at least 1 (0 would invite a retry storm), 1 if not finite."""
    return max(1, math.ceil(delay)) if math.isfinite(delay) else 1


def _retry_later(status: int, code: str, delay: float) -> Answer:
    seconds = _whole_seconds(delay)
    return Answer(status, {"error": code, "retry_after": seconds}, {"Retry-After": str(seconds)})


def answer_for(exc: BaseException) -> Answer | None:
    """The answer for ``exc``, or None if it is not one of :data:`ANSWERED`.

    ==================================  ======  ===============================  =======
    exception                           status  ``error``                        logged
    ==================================  ======  ===============================  =======
    ``KMSDecryptRateLimited``           429     ``decrypt_rate_limited``         no
    ``CircuitOpenError``                503     ``kms_unavailable``              no
    ``KeyServiceError``, transient      503     ``key_service_unavailable``      WARNING
    ``KeyServiceError``, not transient  500     ``key_service_error``            WARNING
    ``EncryptionContextMismatchError``  409     ``encryption_context_mismatch``  WARNING
    ``AuthenticationError``             422     ``message_not_authentic``        WARNING
    ``TruncatedMessageError``           422     ``message_truncated``            WARNING
    ``MessageLimitError``               422     ``message_limit_exceeded``       WARNING
    ``MalformedMessageError``           422     ``malformed_message``            WARNING
    ``CommitmentPolicyError``           422     ``algorithm_suite_not_allowed``  WARNING
    ``SignedStreamRefusedError``        422     ``signed_message_refused``       WARNING
    ``NoUsableKeyError``                422     ``no_usable_key``                WARNING
    ``BranchKeyStoreError``             500     ``key_store_error``              WARNING
    ==================================  ======  ===============================  =======

    The 429 and 503s carry ``Retry-After: n`` and ``"retry_after": n`` in the body: the
    error's ``retry_after`` in whole seconds, rounded up, at least 1, and
    :data:`KEY_SERVICE_RETRY_AFTER` for a transient key-service failure.

    Why a transient ``KeyServiceError`` is a 503 and not a 500: it says nothing about
    the request (throttling or 5xx after retries, a timeout, the network), so the same
    request is worth sending again shortly. A non-transient one is an answer (access
    denied, a disabled key, an unexpected key): a misconfiguration that no retry fixes;
    the client learns only that the server failed, the operator gets the key ARN and
    KMS's code in the log line.
    """
    if isinstance(exc, KMSDecryptRateLimited):
        answer = _retry_later(429, "decrypt_rate_limited", exc.retry_after)
        return Answer(answer.status, answer.body, answer.headers, logged=False)
    if isinstance(exc, CircuitOpenError):
        answer = _retry_later(503, "kms_unavailable", exc.retry_after)
        return Answer(answer.status, answer.body, answer.headers, logged=False)
    if isinstance(exc, KeyServiceError):
        if exc.transient:
            return _retry_later(503, "key_service_unavailable", KEY_SERVICE_RETRY_AFTER)
        return Answer(500, {"error": "key_service_error"})
    for cls, status, code in _REFUSALS:
        if isinstance(exc, cls):
            return Answer(status, {"error": code})
    return None


def _one_line(text: str) -> str:
    """``text`` safe for a one-line log record: control characters (which a path or a
    hostile message's fields could carry) escaped, and cut short."""
    if len(text) > _MAX_LOGGED:
        text = text[:_MAX_LOGGED] + "..."
    return "".join(
        ch if ch.isprintable() or ch == " " else ch.encode("unicode_escape").decode("ascii")
        for ch in text
    )


def log_answered(method: str, path: str, exc: BaseException, answer: Answer) -> None:
    """One WARNING line for an error answered with ``answer``, e.g.::

        GET /files/q3.csv answered 409 encryption_context_mismatch:
        EncryptionContextMismatchError: encryption context value for key 'file' does not
        match the message

    (on one line). The error's text names keys by ID or ARN, never key bytes. The query
    string is left out (it may carry tokens). The record's ``extra`` fields
    ``http_method``, ``http_path``, ``http_status``, ``error_code`` and ``error_class``
    serve structured log handlers.
    """
    if not answer.logged:
        return
    name = type(exc).__name__
    log.warning(
        "%s %s answered %d %s: %s: %s",
        _one_line(method),
        _one_line(path),
        answer.status,
        answer.code,
        name,
        _one_line(str(exc)),
        extra={
            "http_method": method,
            "http_path": path,
            "http_status": answer.status,
            "error_code": answer.code,
            "error_class": name,
        },
    )


def log_cut_off(method: str, path: str, exc: BaseException) -> None:
    """One WARNING line for an error raised after the response started, when its status
    can no longer change: the body is cut off (the connection dropped without the end
    of the body), and this line is the only trace the operator gets of *why*. Errors
    :func:`answer_for` would not log (a rate limit) are not logged here either."""
    answer = answer_for(exc)
    if answer is None or not answer.logged:
        return
    name = type(exc).__name__
    log.warning(
        "%s %s cut off mid-body (the status had been sent; would have been %d %s): %s: %s",
        _one_line(method),
        _one_line(path),
        answer.status,
        answer.code,
        name,
        _one_line(str(exc)),
        extra={
            "http_method": method,
            "http_path": path,
            "http_status": None,
            "error_code": answer.code,
            "error_class": name,
        },
    )
