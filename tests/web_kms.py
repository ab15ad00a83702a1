"""The KMS keyring the web integration tests (aiohttp, Starlette) give their apps.

It talks to ``endpoint_url``, the moto server or a :class:`fault_proxy.FaultProxy` in
front of it, with one attempt per call, so that one injected failure is one failed call
(the circuit breaker counts calls), and no start-up ``DescribeKey`` (the proxy counts
requests). It shares the run's one aioboto3 session (see moto_keyrings).
"""

from __future__ import annotations

from kms_server import REGION, KmsKey
from moto_keyrings import shared_session

from aioenvelope import KmsKeyring

__all__ = ["one_attempt_kms_keyring"]


def one_attempt_kms_keyring(endpoint_url: str, key: KmsKey) -> KmsKeyring:
    return KmsKeyring(
        key.arn,
        session=shared_session(),
        region_name=REGION,
        endpoint_url=endpoint_url,
        check_keys=False,
        max_attempts=1,
    )
