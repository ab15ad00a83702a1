"""An embedded KMS for demos and first runs: moto's server on loopback.

Installed with the ``demo`` extra. It answers like KMS but keeps keys in memory and
enforces little (no IAM, no key policies): for trying the library, never for data.
The same endpoint serves every AWS service moto has, so the examples also keep their
files in its S3 and a hierarchical keyring's branch keys in its DynamoDB
(``BranchKeyStore(..., endpoint_url=kms.endpoint_url, session=kms.session())``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import aioboto3

from .errors import ConfigurationError

__all__ = ["EmbeddedKms", "embedded_kms"]

_DEMO_CREDENTIALS = {
    "aws_access_key_id": "embedded-kms",
    "aws_secret_access_key": "embedded-kms",  # not a secret: moto accepts any
}


@dataclass(frozen=True)
class EmbeddedKms:
    endpoint_url: str
    region: str

    def session(self) -> aioboto3.Session:
        """A session with throwaway credentials, so real ones never go to the stand-in."""
        return aioboto3.Session(region_name=self.region, **_DEMO_CREDENTIALS)

    async def create_key(self, alias: str, description: str = "aioenvelope demo key") -> str:
        """Create a symmetric key with ``alias``; return the key ARN."""
        async with self.session().client("kms", endpoint_url=self.endpoint_url) as kms:
            meta = (await kms.create_key(Description=description))["KeyMetadata"]
            await kms.create_alias(AliasName=f"alias/{alias}", TargetKeyId=meta["KeyId"])
            return str(meta["Arn"])


@contextlib.contextmanager
def embedded_kms(region: str = "us-west-2") -> Iterator[EmbeddedKms]:
    """Run a moto KMS server on 127.0.0.1 (a free port) for the duration."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        raise ConfigurationError(
            "the embedded KMS needs moto: pip install 'aioenvelope[demo]'"
        ) from None
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield EmbeddedKms(f"http://{host}:{port}", region)
    finally:
        server.stop()
