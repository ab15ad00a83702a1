"""Our ``KmsKeyring`` pointed at the session's moto server, on one shared aioboto3 session.

A fresh ``aioboto3.Session`` per keyring reloads botocore's service models (slow, and
it proves nothing), so every keyring made here shares one, created on first use, after
``moto_kms`` has set the dummy credentials.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aioboto3
from fault_proxy import FaultProxy
from kms_server import KmsKey, MotoKms

from aioenvelope import KmsDiscoveryKeyring, KmsKeyring

_shared: list[Any] = []


def shared_session() -> Any:
    """The one aioboto3 session of the test run."""
    if not _shared:
        _shared.append(aioboto3.Session())
    return _shared[0]


def moto_kms_keyring(moto_kms: MotoKms, key_arn: str, **kwargs: Any) -> KmsKeyring:
    """A KmsKeyring on ``key_arn`` talking to moto; ``kwargs`` as KmsKeyring takes them
    (``check_keys=False`` skips the start-up DescribeKey, ``session=`` another session,
    ``endpoint_url=`` a fault proxy in front of moto, ``region_name=`` another region)."""
    kwargs.setdefault("session", shared_session())
    kwargs.setdefault("endpoint_url", moto_kms.endpoint_url)
    kwargs.setdefault("region_name", moto_kms.region)
    return KmsKeyring(key_arn, **kwargs)


def moto_kms_discovery_keyring(moto_kms: MotoKms, **kwargs: Any) -> KmsDiscoveryKeyring:
    """A KmsDiscoveryKeyring talking to moto, home region moto's; ``kwargs`` as for
    :func:`moto_kms_keyring`, and as KmsDiscoveryKeyring takes them."""
    kwargs.setdefault("session", shared_session())
    kwargs.setdefault("endpoint_url", moto_kms.endpoint_url)
    kwargs.setdefault("region_name", moto_kms.region)
    return KmsDiscoveryKeyring(**kwargs)


KmsKeyringFactory = Callable[..., KmsKeyring]
"""The ``make_kms_keyring`` fixture's type: ``make_kms_keyring(key, **kwargs)``."""


def kms_via(proxy: FaultProxy, moto: MotoKms, key: KmsKey, **options: Any) -> KmsKeyring:
    """A keyring for ``key`` whose calls go through the fault proxy in front of moto
    (no start-up key check unless asked: tests count the calls they make)."""
    options.setdefault("check_keys", False)
    return moto_kms_keyring(moto, key.arn, endpoint_url=proxy.url, **options)
