"""The AWS KMS Hierarchical keyring: branch keys in DynamoDB, data keys wrapped locally."""

from .branch_key_store import BranchKeyStore
from .keyring import HierarchicalKeyring

__all__ = ["BranchKeyStore", "HierarchicalKeyring"]
