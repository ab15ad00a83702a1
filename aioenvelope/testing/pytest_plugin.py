"""pytest fixtures for testing code that uses aioenvelope, offline.

Registered through the ``pytest11`` entry point of the package, and active only when the
``testing`` extra (moto's server) is installed: without it this module defines nothing,
so installing aioenvelope never changes anyone's test run.

- ``embedded_aws``: one :class:`~aioenvelope.testing.EmbeddedAws` for the test session
  (a moto server on 127.0.0.1: KMS, DynamoDB, S3). While it runs, the process's AWS
  environment holds throwaway credentials and its region, and no profile, so code that
  builds its own boto3/aioboto3 session can never reach real AWS with real credentials;
  the environment is restored afterwards.
- ``kms_key_arn``: a fresh symmetric KMS key's ARN on that server, for each test.

Both are synchronous fixtures (made with boto3), so they work with pytest-asyncio,
anyio's plugin or plain tests alike::

    async def test_round_trip(embedded_aws, kms_key_arn):
        keyring = KmsKeyring(
            kms_key_arn, session=embedded_aws.session(), endpoint_url=embedded_aws.endpoint_url
        )
        async with EnvelopeClient(keyring) as client:
            assert await client.decrypt(await client.encrypt(b"x")) == b"x"
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest

from . import DUMMY_CREDENTIALS, REAL_AWS_ENVIRONMENT, EmbeddedAws

__all__: list[str] = []

if importlib.util.find_spec("moto") is not None:
    __all__ += ["embedded_aws", "kms_key_arn"]

    @pytest.fixture(scope="session")
    def embedded_aws() -> Iterator[EmbeddedAws]:
        """A moto server for the whole test session, with a throwaway AWS environment."""
        with pytest.MonkeyPatch.context() as env:
            for name in REAL_AWS_ENVIRONMENT:
                env.delenv(name, raising=False)
            env.setenv("AWS_ACCESS_KEY_ID", DUMMY_CREDENTIALS["aws_access_key_id"])
            env.setenv("AWS_SECRET_ACCESS_KEY", DUMMY_CREDENTIALS["aws_secret_access_key"])
            with EmbeddedAws() as aws:
                env.setenv("AWS_DEFAULT_REGION", aws.region)
                env.setenv("AWS_REGION", aws.region)
                yield aws

    @pytest.fixture
    def kms_key_arn(embedded_aws: EmbeddedAws) -> str:
        """A new symmetric KMS key on the embedded server; its ARN."""
        import boto3

        kms = boto3.client("kms", **embedded_aws.client_kwargs())
        return str(kms.create_key(Description="aioenvelope.testing")["KeyMetadata"]["Arn"])
