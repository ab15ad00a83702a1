"""``aioenvelope demo``: the quickstart's job, end to end, against an embedded KMS, then
per-record encryption contexts under the hierarchical keyring.

It lives in the package (unlike ``examples/quickstart.py``) so that an installed CLI can
run it: records and a file under one KMS key, a tampered record and a wrong tenant
refused, and the KMS calls it took, which is the point: a handful, not one per message.
Then the case that defeats a KMS keyring's data-key cache, a context per record: 1,000
records of two tenants, each bound to its own ID, cost one DynamoDB GetItem and one KMS
Decrypt per tenant under the hierarchical keyring, and a KMS call per record each way
under a KMS keyring. ``python -m aioenvelope._demo`` runs that part alone (``nox -s
demo`` does, after the quickstart).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from .client import EnvelopeClient
from .errors import AuthenticationError, EncryptionContextMismatchError
from .keyrings import BranchKeyStore, HierarchicalKeyring, KmsKeyring
from .stats import ClientStats
from .testing import EmbeddedAws, embedded_aws

__all__ = ["run_demo", "run_per_record_demo"]

ALIAS = "aioenvelope-demo"
TENANTS = ("acme", "globex")
KEY_STORE_TABLE = "aioenvelope-demo-branch-keys"
KEY_STORE_NAME = "aioenvelope-demo"


async def run_demo(
    say: Callable[[str], None] = print,
    *,
    records: int = 200,
    per_record: int = 1000,
    per_record_kms: int = 100,
) -> ClientStats:
    """Run the demo, reporting each step through ``say``; returns the counters of the
    quickstart part's client (the per-record part reports its own)."""
    stats = await _quickstart(say, records)
    await run_per_record_demo(say, records=per_record, kms_records=per_record_kms)
    return stats


async def _quickstart(say: Callable[[str], None], records: int) -> ClientStats:
    with embedded_aws() as kms:
        say(f"started an embedded KMS (moto) at {kms.endpoint_url}")
        say(f"created key {await kms.create_kms_key(ALIAS)}")
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


# -- per-record contexts ------------------------------------------------------------------


def _record_context(index: int) -> dict[str, str]:
    """Record ``index``'s context: its tenant and its own ID, so a copy of its ciphertext
    under another ID or tenant fails to decrypt."""
    return {"tenant": TENANTS[index % len(TENANTS)], "record_id": f"r{index}"}


def _tenant_branch_key(context: Mapping[str, str]) -> str:
    """The branch key of the record's tenant: one per tenant, so each tenant's records
    are wrapped under keys derived from its own branch key."""
    return f"tenant-{context['tenant']}"


def _calls(stats: ClientStats) -> str:
    def listed(calls: Mapping[str, int]) -> str:
        inner = ", ".join(f"{op} {n}" for op, n in sorted(calls.items()))
        return f"{sum(calls.values())}" + (f" ({inner})" if inner else "")

    return f"KMS calls {listed(stats.kms_calls)}, DynamoDB calls {listed(stats.dynamodb_calls)}"


async def run_per_record_demo(
    say: Callable[[str], None] = print, *, records: int = 1000, kms_records: int = 100
) -> tuple[ClientStats, ClientStats, ClientStats]:
    """``records`` records, each under its own encryption context, through the
    hierarchical keyring (a branch key per tenant, in a DynamoDB table on the embedded
    KMS's moto), decrypted by the same client and by a fresh one; then ``kms_records``
    of them through a KMS keyring for comparison. Returns the three clients' counters
    (writer, fresh reader, KMS keyring)."""
    with embedded_aws() as kms:
        say(f"started an embedded KMS and DynamoDB (moto) at {kms.endpoint_url}")
        key_arn = await kms.create_kms_key(f"{ALIAS}-branch-keys")
        async with _store(kms, key_arn) as admin:
            await admin.create_table()
            for tenant in TENANTS:
                await admin.create_branch_key(_tenant_branch_key({"tenant": tenant}))
        say(
            f"created key store table {KEY_STORE_TABLE} under {key_arn}, with a branch key "
            f"per tenant: {', '.join(_tenant_branch_key({'tenant': t}) for t in TENANTS)}"
        )
        items = [
            (f"card ending {1000 + i % 9000}".encode(), _record_context(i)) for i in range(records)
        ]

        started = time.perf_counter()
        async with EnvelopeClient(_hierarchical(kms, key_arn)) as writer:
            sealed = await asyncio.gather(
                *(writer.encrypt(p, encryption_context=c) for p, c in items)
            )
            await _open_all(writer, sealed, items)
            written = writer.stats
        elapsed = time.perf_counter() - started
        say(
            f"hierarchical keyring: {records} records, {records} distinct encryption "
            f"contexts, {len(TENANTS)} tenants, encrypted and decrypted in {elapsed:.2f} s: "
            f"{_calls(written)}"
        )

        async with EnvelopeClient(_hierarchical(kms, key_arn)) as reader:
            await _open_all(reader, sealed, items)
            try:
                await reader.decrypt(sealed[0], encryption_context=items[2][1])
            except EncryptionContextMismatchError as exc:
                say(f"record r0 read as record r2 refused: {exc}")
            fresh = reader.stats
        say(f"a fresh client decrypted all {records}: {_calls(fresh)}")

        started = time.perf_counter()
        keyring = KmsKeyring(
            key_arn, session=kms.session(), region_name=kms.region, endpoint_url=kms.endpoint_url
        )
        async with EnvelopeClient(keyring) as per_call:
            some = [await per_call.encrypt(p, encryption_context=c) for p, c in items[:kms_records]]
            await _open_all(per_call, some, items[:kms_records])
            by_kms = per_call.stats
        elapsed = time.perf_counter() - started
        say(
            f"KMS keyring, for comparison: {kms_records} records, {kms_records} distinct "
            f"encryption contexts, encrypted and decrypted in {elapsed:.2f} s: {_calls(by_kms)}"
        )
    return written, fresh, by_kms


def _store(kms: EmbeddedAws, key_arn: str) -> BranchKeyStore:
    return BranchKeyStore(
        KEY_STORE_TABLE,
        logical_key_store_name=KEY_STORE_NAME,
        kms_key_id=key_arn,
        session=kms.session(),
        region_name=kms.region,
        endpoint_url=kms.endpoint_url,
    )


def _hierarchical(kms: EmbeddedAws, key_arn: str) -> HierarchicalKeyring:
    return HierarchicalKeyring(_store(kms, key_arn), branch_key_id_supplier=_tenant_branch_key)


async def _open_all(
    client: EnvelopeClient, sealed: list[bytes], items: list[tuple[bytes, dict[str, str]]]
) -> None:
    """Decrypt every record, each under its own context, all at once."""
    opened = await asyncio.gather(
        *(
            client.decrypt(blob, encryption_context=context)
            for blob, (_, context) in zip(sealed, items, strict=True)
        )
    )
    if opened != [plaintext for plaintext, _ in items]:
        raise RuntimeError("the records did not decrypt to what was encrypted")


if __name__ == "__main__":
    asyncio.run(run_per_record_demo())
