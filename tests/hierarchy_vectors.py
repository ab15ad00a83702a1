"""Read ``../shared/hierarchy-vectors/vectors.json``: messages the AWS Encryption SDK for
Python wrote with the MPL's hierarchical keyring, and the branch keys that wrapped them.

Located like the ESDK vectors (``esdk_vectors.py``): beside the project by default,
``$AIOENVELOPE_HIERARCHY_VECTORS`` to point elsewhere. CI sets
``$AIOENVELOPE_REQUIRE_HIERARCHY_VECTORS`` (``.ci/run``) so a missing file fails instead
of skipping. The ESDK variables are not reused: their tally counts the ESDK bundles.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_DIR",
    "ENV_VAR",
    "REQUIRE_VAR",
    "HierarchyVector",
    "VectorFile",
    "load_vectors",
    "missing_vectors_message",
    "vectors_dir",
    "vectors_required",
]

ENV_VAR = "AIOENVELOPE_HIERARCHY_VECTORS"
REQUIRE_VAR = "AIOENVELOPE_REQUIRE_HIERARCHY_VECTORS"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = (PROJECT_ROOT / ".." / "shared" / "hierarchy-vectors").resolve()
FILE_NAME = "vectors.json"
ORIGIN = (
    "messages written by aws-encryption-sdk 4.x with the aws-cryptographic-material-providers "
    "hierarchical keyring over a moto key store (see ../shared/hierarchy-vectors/README.md)"
)


def vectors_dir() -> Path:
    """``$AIOENVELOPE_HIERARCHY_VECTORS`` when set, else ``../shared/hierarchy-vectors``."""
    override = os.environ.get(ENV_VAR)
    return Path(override) if override else DEFAULT_DIR


def vectors_required() -> bool:
    """Whether this run must use the vectors (CI), rather than skip them when absent."""
    return os.environ.get(REQUIRE_VAR, "") not in ("", "0")


def missing_vectors_message(path: Path) -> str:
    return (
        f"hierarchical keyring vectors not found at {path / FILE_NAME}: {ORIGIN}; put "
        f"{FILE_NAME} in ../shared/hierarchy-vectors beside the project, or set {ENV_VAR} "
        "to the folder holding it"
    )


@dataclass(frozen=True)
class HierarchyVector:
    algorithm: str  # an AlgorithmSuite member name
    branch_key_version: str
    branch_key: bytes = field(repr=False)
    message: bytes = field(repr=False)
    plaintext: bytes = field(repr=False)
    data_key: bytes | None = field(repr=False)  # pdk_hex, where the vector has it


@dataclass(frozen=True)
class VectorFile:
    branch_key_id: str
    vectors: tuple[HierarchyVector, ...]


def load_vectors(path: Path) -> VectorFile:
    """Every vector of ``path / vectors.json``; an unknown field fails loudly."""
    data: dict[str, Any] = json.loads((path / FILE_NAME).read_text(encoding="utf-8"))
    known = {"algorithm", "branch_key_version", "branch_key_hex", "message_b64"}
    known |= {"plaintext_hex", "pdk_hex"}
    vectors = []
    for entry in data["vectors"]:
        unknown = set(entry) - known
        if unknown:
            raise ValueError(f"{path / FILE_NAME}: unknown vector fields {sorted(unknown)}")
        pdk = entry.get("pdk_hex")
        vectors.append(
            HierarchyVector(
                algorithm=entry["algorithm"],
                branch_key_version=entry["branch_key_version"],
                branch_key=bytes.fromhex(entry["branch_key_hex"]),
                message=base64.b64decode(entry["message_b64"], validate=True),
                plaintext=bytes.fromhex(entry["plaintext_hex"]),
                data_key=None if pdk is None else bytes.fromhex(pdk),
            )
        )
    return VectorFile(branch_key_id=data["branch_key_id"], vectors=tuple(vectors))
