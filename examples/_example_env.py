"""What the two example services share: their command line, and the AWS they run on.

That is real AWS KMS and S3 when a key is given (``--kms-key-id`` or
``AIOENVELOPE_KMS_KEY_ID``, your usual credentials, an existing ``--bucket``), any
KMS+S3 endpoint with ``--endpoint-url``, and otherwise an embedded KMS and S3 (moto,
on 127.0.0.1, in memory) with a fresh key and bucket, so the examples run with no AWS
account at all.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aioboto3

from aioenvelope import EnvelopeClient, KmsKeyring
from aioenvelope._embedded_kms import embedded_kms

__all__ = ["Aws", "aws_from", "parse_args"]


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--db", default="records.db", help="the SQLite file for records")
    parser.add_argument("--bucket", default="aioenvelope-example", help="the S3 bucket for files")
    parser.add_argument("--kms-key-id", default=os.environ.get("AIOENVELOPE_KMS_KEY_ID"))
    parser.add_argument("--endpoint-url", help="a KMS and S3 endpoint other than AWS's")
    parser.add_argument("--region", default=None, help="defaults to your AWS configuration's")
    return parser.parse_args()


@dataclass(frozen=True)
class Aws:
    """Where a service keeps its key and its files. One session for KMS and S3, so
    botocore loads its service models once."""

    session: aioboto3.Session
    key_id: str
    bucket: str
    endpoint_url: str | None = None

    def envelope_client(self) -> EnvelopeClient:
        """A new client: the app's lifespan calls this at start-up, inside the running
        loop that the client's KMS connections then belong to."""
        keyring = KmsKeyring(self.key_id, session=self.session, endpoint_url=self.endpoint_url)
        return EnvelopeClient(keyring)

    def s3(self) -> Any:  # aioboto3 has no type stubs
        """An S3 client, to enter with ``async with`` for the life of the app."""
        return self.session.client("s3", endpoint_url=self.endpoint_url)


@contextlib.asynccontextmanager
async def aws_from(args: argparse.Namespace) -> AsyncIterator[Aws]:
    """The AWS that ``args`` names, or an embedded one for as long as the service runs."""
    if args.kms_key_id:
        session = aioboto3.Session(region_name=args.region)
        yield Aws(session, args.kms_key_id, args.bucket, args.endpoint_url)
        return
    with embedded_kms() as moto:
        print(
            "no KMS key configured (--kms-key-id or AIOENVELOPE_KMS_KEY_ID for AWS): "
            f"started an embedded KMS and S3 (moto, in memory) at {moto.endpoint_url}",
            flush=True,
        )
        key_arn = await moto.create_key("aioenvelope-example")
        aws = Aws(moto.session(), key_arn, args.bucket, moto.endpoint_url)
        async with aws.s3() as s3:
            await s3.create_bucket(
                Bucket=aws.bucket, CreateBucketConfiguration={"LocationConstraint": moto.region}
            )
        print(f"created KMS key {key_arn} and S3 bucket {aws.bucket}", flush=True)
        yield aws
