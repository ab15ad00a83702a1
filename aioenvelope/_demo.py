"""``aioenvelope demo``: the quickstart's job, end to end, against an embedded KMS.

It lives in the package (unlike ``examples/quickstart.py``) so that an installed CLI can
run it: records and a file under one KMS key, a tampered record and a wrong tenant
refused, and the KMS calls it took, which is the point: a handful, not one per message.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from ._embedded_kms import embedded_kms
from .client import EnvelopeClient
from .errors import AuthenticationError, EncryptionContextMismatchError
from .keyrings import KmsKeyring
from .stats import ClientStats

__all__ = ["run_demo"]

ALIAS = "aioenvelope-demo"


async def run_demo(say: Callable[[str], None] = print, *, records: int = 200) -> ClientStats:
    """Run the demo, reporting each step through ``say``; returns the client's counters."""
    with embedded_kms() as kms:
        say(f"started an embedded KMS (moto) at {kms.endpoint_url}")
        say(f"created key {await kms.create_key(ALIAS)}")
        keyring = KmsKeyring(
            f"alias/{ALIAS}",
            session=kms.session(),
            region_name=kms.region,
            endpoint_url=kms.endpoint_url,
        )
        async with EnvelopeClient(keyring) as client:
            await _records(client, say, records)
            await _file(client, say)
            stats = client.stats
    calls = ", ".join(f"{op} {n}" for op, n in sorted(stats.kms_calls.items()))
    say(f"KMS calls made: {sum(stats.kms_calls.values())} ({calls})")
    say(
        f"data keys reused for {stats.encrypt_cache_hits} encryptions, "
        f"cached for {stats.decrypt_cache_hits} decryptions"
    )
    return stats


async def _records(client: EnvelopeClient, say: Callable[[str], None], count: int) -> None:
    """Many small records under one context share one data key (each message still
    derives its own AES key); then tampering and a wrong context are refused."""
    context = {"tenant": "t1", "table": "cards"}
    records = [f"card ending {1000 + i}".encode() for i in range(count)]
    sealed = [await client.encrypt(r, encryption_context=context) for r in records]
    opened = [await client.decrypt(blob, encryption_context=context) for blob in sealed]
    if opened != records:
        raise RuntimeError("the records did not decrypt to what was encrypted")
    say(f"encrypted and decrypted {count} records")
    tampered = bytearray(sealed[0])
    tampered[-20] ^= 0x01
    try:
        await client.decrypt(bytes(tampered))
    except AuthenticationError as exc:
        say(f"tampered record refused: {exc}")
    try:
        await client.decrypt(sealed[1], encryption_context={"tenant": "t2"})
    except EncryptionContextMismatchError as exc:
        say(f"wrong tenant refused: {exc}")


async def _file(client: EnvelopeClient, say: Callable[[str], None]) -> None:
    """A file streams through at constant memory and appears only once complete."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "report.csv"
        source.write_bytes(
            b"id,amount\n" + b"".join(b"%d,%d\n" % (i, i * 7) for i in range(50_000))
        )
        target = source.with_suffix(".csv.encrypted")
        context = {"file": source.name}
        await client.encrypt_file(source, target, encryption_context=context)
        restored = source.with_suffix(".restored.csv")
        header = await client.decrypt_file(target, restored, encryption_context=context)
        if restored.read_bytes() != source.read_bytes():
            raise RuntimeError("the file did not decrypt to what was encrypted")
        wrapped_by = header.encrypted_data_keys[0].provider_info.decode()
        say(
            f"file: {source.stat().st_size} bytes -> {target.stat().st_size} bytes "
            f"({header.algorithm_suite.name}, data key wrapped by {wrapped_by})"
        )
