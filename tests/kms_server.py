"""A real KMS for tests: moto's threaded server on loopback, plus key helpers.

moto's in-process ``mock_aws`` does not work with aiobotocore, so tests talk HTTP to a
``ThreadedMotoServer`` the way the library talks to KMS.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3

from aioenvelope.testing import embedded_aws

REGION = "us-west-2"
DUMMY_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": REGION,
}


@dataclass(frozen=True)
class KmsKey:
    key_id: str
    arn: str
    alias_name: str
    alias_arn: str

    @property
    def account(self) -> str:
        return self.arn.split(":")[4]


class MotoKms:
    """A running moto server and a boto3 admin client to set up keys."""

    def __init__(self, endpoint_url: str) -> None:
        self.endpoint_url = endpoint_url
        self.region = REGION
        self.admin = boto3.client("kms", region_name=REGION, endpoint_url=endpoint_url)

    def admin_in(self, region: str) -> Any:
        return boto3.client("kms", region_name=region, endpoint_url=self.endpoint_url)

    def create_key(
        self, alias: str | None = None, *, region: str | None = None, **kwargs: Any
    ) -> KmsKey:
        admin = self.admin_in(region) if region else self.admin
        meta = admin.create_key(**kwargs)["KeyMetadata"]
        alias_name = f"alias/{alias or 'k-' + meta['KeyId'][:8]}"
        admin.create_alias(AliasName=alias_name, TargetKeyId=meta["KeyId"])
        alias_arn = meta["Arn"].split(":key/")[0] + ":" + alias_name
        return KmsKey(meta["KeyId"], meta["Arn"], alias_name, alias_arn)


@contextlib.contextmanager
def dummy_credentials() -> Iterator[None]:
    """Dummy credentials for the duration (never real ones: tests must not reach AWS)."""
    saved = {name: os.environ.get(name) for name in DUMMY_CREDENTIALS}
    os.environ.update(DUMMY_CREDENTIALS)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def running_moto() -> Iterator[MotoKms]:
    """The library's embedded KMS (moto's threaded server on 127.0.0.1, a free port)."""
    with embedded_aws(REGION) as kms:
        yield MotoKms(kms.endpoint_url)
