"""Quickstart: encrypt records and a file, decrypt them, and see a tampered one refused.

Runs with a locally generated AES-256 wrapping key. (The KMS keyring replaces it once it
lands; the calls below stay the same.)
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

from aioenvelope import EnvelopeClient, RawAesKeyring, errors


async def main() -> None:
    keyring = RawAesKeyring("quickstart", "demo-key", os.urandom(32))
    async with EnvelopeClient(keyring) as client:
        records = {f"user-{i}": f"card ending {1000 + i}".encode() for i in range(5)}
        sealed = {
            rid: await client.encrypt(data, encryption_context={"tenant": "t1", "record": rid})
            for rid, data in records.items()
        }
        for rid, blob in sealed.items():
            plain = await client.decrypt(blob, encryption_context={"tenant": "t1", "record": rid})
            assert plain == records[rid]
        print(f"encrypted and decrypted {len(records)} records")

        with tempfile.TemporaryDirectory() as tmp:
            source = Path(tmp) / "report.csv"
            source.write_bytes(
                b"id,amount\n" + b"".join(b"%d,%d\n" % (i, i * 7) for i in range(50_000))
            )
            target = source.with_suffix(".csv.encrypted")
            target.write_bytes(
                await client.encrypt(source.read_bytes(), encryption_context={"file": source.name})
            )
            result = await client.decrypt_with_header(target.read_bytes())
            assert result.plaintext == source.read_bytes()
            print(
                f"file: {source.stat().st_size} bytes -> {target.stat().st_size} bytes "
                f"({result.header.algorithm_suite.name}, "
                f"{len(result.header.encrypted_data_keys)} encrypted data key)"
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


if __name__ == "__main__":
    asyncio.run(main())
