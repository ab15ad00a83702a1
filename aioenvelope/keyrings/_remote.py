"""What the remote keyrings' transports (Vault, Cloud KMS, Key Vault) share: the circuit
breaker's verdict on a call, and the error that ends a call whose attempts ran out.

AWS KMS and DynamoDB have their own (``kms_clients.py``: botocore retries inside a
call and answers in its own terms); these three retry themselves, one attempt at a time.
"""

from __future__ import annotations

from typing import TypeVar

from ..breaker import CircuitBreaker
from ..errors import KeyServiceError

__all__ = ["last_of_attempts", "record_verdict"]

E = TypeVar("E", bound=KeyServiceError)


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
        breaker.record_failure(service)
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
