"""``aioenvelope branch-key``: administer the DynamoDB key store of a hierarchical keyring.

Each action prints one result on stdout, for scripts: ``create-table`` the table's ARN,
``create`` the new branch key's ID, ``rotate`` the new active version, ``show`` a JSON
object. ``show`` has KMS decrypt the item it reads (1 GetItem, 1 Decrypt), so it also
proves that the table, the logical name and the KMS key are the right ones; the key is
zeroed at once. What it prints is what every reader of the table may know: IDs, the
version, the custom encryption context (stored in clear in the item) and the store's
coordinates. Never key material, and never ``enc`` (the KMS ciphertext of the key,
whose only use is to be decrypted).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from typing import Any

from ..keyrings import BranchKeyStore
from ..keyrings.hierarchy.branch_key_store import BranchKeyMaterials
from ._keys import KmsOptions, branch_key_store, is_key_arn
from ._paths import UsageError

__all__ = ["branch_key_command"]


def _store(args: argparse.Namespace) -> BranchKeyStore:
    if not is_key_arn(args.key_store_kms_key):
        raise UsageError(
            "--key-store-kms-key must be the key store's KMS key ARN "
            f"(arn:aws:kms:REGION:ACCOUNT:key/ID), not {args.key_store_kms_key!r}"
        )
    kms = KmsOptions(region=args.region, endpoint_url=args.endpoint_url, profile=args.profile)
    # create-table needs no logical name (nothing is encrypted); the store wants one.
    name: str = args.key_store_name or "unused-by-create-table"
    return branch_key_store(args.key_store_table, name, args.key_store_kms_key, kms, kms.session())


def _context(pairs: list[tuple[str, str]]) -> dict[str, str]:
    context: dict[str, str] = {}
    for key, value in pairs:
        if key in context:
            raise UsageError(f"encryption context key {key!r} given twice")
        context[key] = value
    return context


def _shown(materials: BranchKeyMaterials) -> dict[str, Any]:
    """What ``show`` prints of one version, the key zeroed before anything is printed."""
    try:
        return {
            "version": materials.version,
            "encryption_context": dict(materials.encryption_context),
        }
    finally:
        materials.wipe()


def _show_json(
    store: BranchKeyStore,
    branch_key_id: str,
    active: Mapping[str, Any],
    version: Mapping[str, Any] | None,
) -> dict[str, Any]:
    document: dict[str, Any] = {
        "branch_key_id": branch_key_id,
        "active_version": active["version"],
        "encryption_context": active["encryption_context"],
        "key_store": {
            "table": store.table_name,
            "logical_name": store.logical_key_store_name,
            "kms_key_arn": store.kms_key_id,
        },
    }
    if version is not None:
        document["version"] = version
    return document


async def branch_key_command(args: argparse.Namespace) -> int:
    """Run one ``branch-key`` action; prints its result on stdout."""
    action: str = args.branch_key_command
    # Checked before the store is opened: a usage error costs no AWS call.
    context = _context(args.context) if action == "create" else {}
    store = _store(args)
    async with store:
        if action == "create-table":
            print(await store.create_table())
        elif action == "create":
            print(await store.create_branch_key(args.branch_key_id, encryption_context=context))
        elif action == "rotate":
            print(await store.rotate_branch_key(args.branch_key_id))
        else:
            active = _shown(await store.get_active_branch_key(args.branch_key_id))
            version: dict[str, Any] | None = None
            if args.branch_key_version is not None:
                version = _shown(
                    await store.get_branch_key_version(args.branch_key_id, args.branch_key_version)
                )
                version["active"] = version["version"] == active["version"]
            document = _show_json(store, args.branch_key_id, active, version)
            print(json.dumps(document, indent=2, ensure_ascii=False))
    return 0
