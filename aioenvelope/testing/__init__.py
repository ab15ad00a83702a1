"""Run your own tests offline, the way aioenvelope's run: a real moto server on loopback.

``pip install 'aioenvelope[testing]'``, then::

    from aioenvelope import EnvelopeClient, KmsKeyring
    from aioenvelope.testing import embedded_aws

    async with embedded_aws() as aws:  # or: with embedded_aws() as aws:
        key_arn = await aws.create_kms_key(alias="orders")
        keyring = KmsKeyring(key_arn, session=aws.session(), endpoint_url=aws.endpoint_url)
        async with EnvelopeClient(keyring) as client:
            ...

With the extra installed, a pytest plugin also offers the fixtures ``embedded_aws`` (one
server for the test session) and ``kms_key_arn`` (a fresh key per test); see
:mod:`aioenvelope.testing.pytest_plugin`.

Why moto's *server* (``ThreadedMotoServer``) and not its in-process ``mock_aws``: the
library talks to AWS through aiobotocore, which ``mock_aws`` does not intercept, so a
test would reach the real AWS, or hang. One endpoint serves KMS, DynamoDB (a
hierarchical keyring's key store) and S3 alike. It answers like AWS but keeps keys in
memory and enforces no IAM or key policies: for tests and demos, never for data.
"""

from __future__ import annotations

import logging
import types
from typing import Any

import aioboto3
import anyio.to_thread

from ..errors import ConfigurationError

__all__ = ["DUMMY_CREDENTIALS", "REAL_AWS_ENVIRONMENT", "EmbeddedAws", "embedded_aws"]

DEFAULT_REGION = "us-west-2"
DUMMY_CREDENTIALS = {
    "aws_access_key_id": "aioenvelope-testing",
    "aws_secret_access_key": "aioenvelope-testing",  # not a secret: moto accepts any
}
"""What :meth:`EmbeddedAws.session` signs with: throwaway, so real credentials never
reach the stand-in (and a request that escaped to AWS would be refused)."""

REAL_AWS_ENVIRONMENT = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)
"""The environment variables botocore reads that could point a client at a real account:
what the pytest plugin removes while the embedded server runs."""


class EmbeddedAws:
    """A moto server on 127.0.0.1 (a free port) while the ``with`` or ``async with``
    block runs: ``endpoint_url`` and ``region`` to hand to keyrings, key stores and
    clients, ``session()`` for an aioboto3 session with throwaway credentials, and
    ``await create_kms_key()`` for a symmetric KMS key."""

    def __init__(self, region: str = DEFAULT_REGION) -> None:
        self.region = region
        self._server: Any = None
        self._endpoint_url: str | None = None

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:PORT``, for every service moto has."""
        if self._endpoint_url is None:
            raise ConfigurationError(
                "the embedded AWS is not running: use it as `with embedded_aws() as aws:` "
                "or `async with embedded_aws() as aws:`"
            )
        return self._endpoint_url

    def __repr__(self) -> str:
        where = self._endpoint_url or "not running"
        return f"EmbeddedAws(region={self.region!r}, endpoint_url={where!r})"

    def session(self) -> aioboto3.Session:
        """An aioboto3 session in ``region`` with throwaway credentials. One per test
        (or app) is enough: each new session loads botocore's models again."""
        return aioboto3.Session(region_name=self.region, **DUMMY_CREDENTIALS)

    def client_kwargs(self) -> dict[str, str]:
        """``endpoint_url``, ``region_name`` and the throwaway credentials, for a client
        you build yourself (``boto3.client("s3", **aws.client_kwargs())``)."""
        return {"endpoint_url": self.endpoint_url, "region_name": self.region, **DUMMY_CREDENTIALS}

    async def create_kms_key(self, alias: str | None = None, *, description: str = "") -> str:
        """Create a symmetric encryption key (with ``alias/<alias>`` if given) and return
        its ARN, which every keyring accepts."""
        async with self.session().client("kms", endpoint_url=self.endpoint_url) as kms:
            meta = (await kms.create_key(Description=description or "aioenvelope.testing"))[
                "KeyMetadata"
            ]
            if alias is not None:
                name = alias if alias.startswith("alias/") else f"alias/{alias}"
                await kms.create_alias(AliasName=name, TargetKeyId=meta["KeyId"])
            return str(meta["Arn"])

    # -- lifetime ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the server (blocks until it listens); ``stop()`` ends it."""
        if self._server is not None:
            raise ConfigurationError("this embedded AWS is already running")
        try:
            from moto.server import ThreadedMotoServer
        except ImportError:
            raise ConfigurationError(
                "the embedded AWS needs moto's server: pip install 'aioenvelope[testing]' (or [demo])"
            ) from None
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        self._server = server
        self._endpoint_url = f"http://{host}:{port}"

    def stop(self) -> None:
        server, self._server, self._endpoint_url = self._server, None, None
        if server is not None:
            server.stop()

    def __enter__(self) -> EmbeddedAws:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def __aenter__(self) -> EmbeddedAws:
        # Starting and stopping the server's thread block for a moment: off the loop.
        await anyio.to_thread.run_sync(self.start)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: types.TracebackType | None,
    ) -> None:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self.stop)


def embedded_aws(region: str = DEFAULT_REGION) -> EmbeddedAws:
    """A moto server for ``with`` or ``async with``: KMS, DynamoDB and S3 on one
    loopback endpoint, in ``region``. See :class:`EmbeddedAws`."""
    return EmbeddedAws(region)
