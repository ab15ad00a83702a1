"""AWS KMS identifiers: parse ARNs, tell key ARNs from aliases, match multi-Region keys.

Pure functions (no I/O), following the ESDK specification's `aws-kms-key-arn.md` and
`aws-kms-mrk-match-for-decrypt.md`.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["KmsArn", "is_mrk_identifier", "mrk_match", "parse_arn"]


@dataclass(frozen=True)
class KmsArn:
    partition: str
    region: str
    account: str
    resource_type: str  # "key" or "alias"
    resource_id: str

    def __str__(self) -> str:
        return (
            f"arn:{self.partition}:kms:{self.region}:{self.account}:"
            f"{self.resource_type}/{self.resource_id}"
        )

    @property
    def is_mrk(self) -> bool:
        return self.resource_type == "key" and self.resource_id.startswith("mrk-")

    def in_region(self, region: str) -> KmsArn:
        return KmsArn(self.partition, region, self.account, self.resource_type, self.resource_id)


def parse_arn(identifier: str) -> KmsArn | None:
    """The ARN, or None when ``identifier`` is not a well-formed KMS ARN."""
    parts = identifier.split(":", 5)
    if len(parts) != 6 or parts[0] != "arn" or parts[2] != "kms":
        return None
    _, partition, _, region, account, resource = parts
    resource_type, sep, resource_id = resource.partition("/")
    if not (partition and region and account and sep and resource_id):
        return None
    if resource_type not in ("key", "alias"):
        return None
    return KmsArn(partition, region, account, resource_type, resource_id)


def is_mrk_identifier(identifier: str) -> bool:
    arn = parse_arn(identifier)
    if arn is not None:
        return arn.is_mrk
    return identifier.startswith("mrk-")


def mrk_match(a: str, b: str) -> bool:
    """True when ``a`` and ``b`` name the same key, treating replicas of one multi-Region
    key in different regions as the same key."""
    if a == b:
        return True
    arn_a, arn_b = parse_arn(a), parse_arn(b)
    if arn_a is None or arn_b is None or not (arn_a.is_mrk and arn_b.is_mrk):
        return False
    return arn_a.in_region(arn_b.region) == arn_b
