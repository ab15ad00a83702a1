"""Quickstart: records and a streamed file under an AWS KMS key, end to end.

With no KMS key configured it starts an embedded KMS (moto, on 127.0.0.1) and says so.
To use real AWS KMS, give a key and have credentials configured as usual
(``AWS_PROFILE``, environment, SSO, instance role):

    AIOENVELOPE_KMS_KEY_ID=arn:aws:kms:eu-west-1:111122223333:key/... python examples/quickstart.py
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from aioenvelope import EnvelopeClient, KmsKeyring, errors
from aioenvelope.testing import embedded_aws


async def run(keyring: KmsKeyring) -> None:
    async with EnvelopeClient(keyring) as client:
        # 1,000 records of one table: the key manager reuses one data key for all of them
        # (each message still derives its own key), and caches it for decryption.
        context = {"tenant": "t1", "table": "cards"}
        records = {f"user-{i}": f"card ending {1000 + i}".encode() for i in range(1000)}
        sealed = {
            rid: await client.encrypt(data, encryption_context=context)
            for rid, data in records.items()
        }
        for rid, blob in sealed.items():
            assert await client.decrypt(blob, encryption_context=context) == records[rid]
        print(f"encrypted and decrypted {len(records)} records")

        with tempfile.TemporaryDirectory() as tmp:
            source = Path(tmp) / "report.csv"
            source.write_bytes(
                b"id,amount\n" + b"".join(b"%d,%d\n" % (i, i * 7) for i in range(50_000))
            )
            # Files stream through at constant memory, and appear only once complete.
            target = source.with_suffix(".csv.encrypted")
            await client.encrypt_file(source, target, encryption_context={"file": source.name})
            restored = source.with_suffix(".restored.csv")
            header = await client.decrypt_file(
                target, restored, encryption_context={"file": source.name}
            )
            assert restored.read_bytes() == source.read_bytes()
            edk = header.encrypted_data_keys[0]
            print(
                f"file: {source.stat().st_size} bytes -> {target.stat().st_size} bytes "
                f"({header.algorithm_suite.name}, data key wrapped by "
                f"{edk.provider_info.decode()})"
            )

        tampered = bytearray(sealed["user-0"])
        tampered[-20] ^= 0x01
        try:
            await client.decrypt(bytes(tampered))
        except errors.AuthenticationError as exc:
            print(f"tampered record refused: {exc}")
        try:
            await client.decrypt(sealed["user-1"], encryption_context={"tenant": "t2"})
        except errors.EncryptionContextMismatchError as exc:
            print(f"wrong tenant refused: {exc}")
        stats = client.stats
    calls = ", ".join(f"{op} {n}" for op, n in sorted(stats.kms_calls.items()))
    print(f"KMS calls made: {sum(stats.kms_calls.values())} ({calls})")
    print(
        f"data keys reused for {stats.encrypt_cache_hits} encryptions, "
        f"cached for {stats.decrypt_cache_hits} decryptions"
    )


@contextlib.asynccontextmanager
async def keyring_from(args: argparse.Namespace) -> AsyncIterator[KmsKeyring]:
    if args.key_id:
        print(f"using AWS KMS key {args.key_id}")
        yield KmsKeyring(args.key_id, region_name=args.region, endpoint_url=args.endpoint_url)
        return
    with embedded_aws() as kms:
        print(
            f"no KMS key configured (set AIOENVELOPE_KMS_KEY_ID for real AWS KMS): "
            f"started an embedded KMS (moto) at {kms.endpoint_url}"
        )
        key_arn = await kms.create_kms_key("aioenvelope-quickstart")
        print(f"created key {key_arn}")
        yield KmsKeyring(
            "alias/aioenvelope-quickstart",
            session=kms.session(),
            region_name=kms.region,
            endpoint_url=kms.endpoint_url,
        )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--key-id", default=os.environ.get("AIOENVELOPE_KMS_KEY_ID"))
    parser.add_argument("--region", default=os.environ.get("AWS_REGION"))
    parser.add_argument("--endpoint-url", default=os.environ.get("AIOENVELOPE_KMS_ENDPOINT_URL"))
    args = parser.parse_args()
    async with keyring_from(args) as keyring:
        await run(keyring)


if __name__ == "__main__":
    asyncio.run(main())
