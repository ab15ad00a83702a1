"""What the remote keyrings' transports (Vault, Cloud KMS, Key Vault) share: the telemetry
watch around a call, the circuit breaker's verdict on it, and the error that ends a call
whose attempts ran out.

AWS KMS and DynamoDB have their own (``kms_clients.py``: botocore retries inside a
call and answers in its own terms); these three retry themselves, one attempt at a time.
"""

from __future__ import annotations

import logging
from typing import TypeVar

from ..breaker import CircuitBreaker
from ..errors import KeyServiceError
from ..runtime import Runtime
from ..telemetry import NULL_OBSERVER, CallWatch

__all__ = ["last_of_attempts", "log_failure", "observe_call", "record_verdict"]

E = TypeVar("E", bound=KeyServiceError)


def observe_call(
    runtime: Runtime | None,
    service: str,
    operation: str,
    key_id: str,
    endpoint: str | None,
    *,
    region: str | None = None,
) -> CallWatch:
    """The telemetry watch around one call (a span and a duration when telemetry is on):
    enter it before the breaker is asked, so a refused call is seen too."""
    observer = runtime.observer if runtime is not None else NULL_OBSERVER
    return observer.call(service, operation, key_id=key_id, endpoint=endpoint, region=region)


def log_failure(
    logger: logging.Logger,
    label: str,
    error: KeyServiceError,
    endpoint: str | None,
    *,
    shown_at: str | None = None,
    unwrap: bool = False,
) -> None:
    """One line for a failed key-service call: ``label``, operation, key, error code
    (never the error's message: a service may echo what it was sent), and the same as
    structured fields (``aioenvelope_endpoint``, ``_service``, ``_operation``,
    ``_error_code``) for JSON log formatters. Not per message: a call is made on a cache
    miss, and decrypt misses are rate-limited.

    WARNING, except a service's refusal to unwrap (``unwrap`` and not transient) at
    DEBUG: a message may carry data keys wrapped for keys this keyring may not use, and
    decrypt tries them in turn, so that refusal is an answer, not a fault, and at
    WARNING it would make a line per message. Outages are WARNING everywhere."""
    logger.log(
        logging.DEBUG if unwrap and not error.transient else logging.WARNING,
        "%s %s with key %s%s failed: %s",
        label,
        error.operation,
        error.key_id,
        f" at {shown_at}" if shown_at else "",
        error.error_code,
        extra={
            "aioenvelope_endpoint": endpoint,
            "aioenvelope_service": error.SERVICE,
            "aioenvelope_operation": error.operation,
            "aioenvelope_error_code": error.error_code,
        },
    )


def record_verdict(
    breaker: CircuitBreaker | None,
    service: str,
    error: KeyServiceError | None,
    *,
    unasked: bool,
) -> None:
    """Tell ``breaker`` how a call to ``service`` went. ``unasked``: the service never
    judged it (the client closed meanwhile, no credentials, a challenge refused before
    sending): no verdict. Otherwise an outage (transient) or an answer that is not the
    service's protocol (``InvalidResponse``) counts as a failure, and any answer, an
    error too, proves the service up."""
    if breaker is None:
        return
    if unasked:
        breaker.record_abandoned()
    elif error is not None and (error.transient or error.error_code == "InvalidResponse"):
        breaker.record_failure(service, error)
    else:
        breaker.record_success(service)


def last_of_attempts(last: E | None, attempts: int) -> E:
    """The error that ends a call: ``last`` itself after one attempt (raised as it is,
    so it is not its own cause), else a copy that says how many attempts were made, of
    the same class, transient (the attempts ran out)."""
    assert last is not None
    if attempts == 1:
        return last
    return type(last)(
        f"{last} (the last of {attempts} attempts)",
        operation=last.operation,
        key_id=last.key_id,
        error_code=last.error_code,
        transient=True,
    )
