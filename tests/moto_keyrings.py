"""Our ``KmsKeyring`` pointed at the session's moto server, on one shared aioboto3 session.

A fresh ``aioboto3.Session`` per keyring reloads botocore's service models (slow, and
it proves nothing), so every keyring made here shares one, created on first use, after
``moto_kms`` has set the dummy credentials.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aioboto3
from kms_server import MotoKms

from aioenvelope import KmsKeyring

_shared: list[Any] = []


def shared_session() -> Any:
    """The one aioboto3 session of the test run."""
    if not _shared:
        _shared.append(aioboto3.Session())
    return _shared[0]


def moto_kms_keyring(moto_kms: MotoKms, key_arn: str, **kwargs: Any) -> KmsKeyring:
    """A KmsKeyring on ``key_arn`` talking to moto; ``kwargs`` as KmsKeyring takes them
    (``check_keys=False`` skips the start-up DescribeKey, ``session=`` another session)."""
    kwargs.setdefault("session", shared_session())
    return KmsKeyring(
        key_arn, endpoint_url=moto_kms.endpoint_url, region_name=moto_kms.region, **kwargs
    )


KmsKeyringFactory = Callable[..., KmsKeyring]
"""The ``make_kms_keyring`` fixture's type: ``make_kms_keyring(key, **kwargs)``."""
