from __future__ import annotations

from ..errors import ConfigurationError


def check_raw_names(key_namespace: str, key_name: str) -> None:
    """Raw keyrings may not pose as KMS (``aws-kms*`` is reserved for it)."""
    if not isinstance(key_namespace, str) or not isinstance(key_name, str):
        raise ConfigurationError("key_namespace and key_name must be str")
    if not key_namespace or not key_name:
        raise ConfigurationError("key_namespace and key_name must not be empty")
    if key_namespace.startswith("aws-kms"):
        raise ConfigurationError(
            "key_namespace may not start with 'aws-kms': that provider ID is reserved for KMS"
        )
    for what, value in (("key_namespace", key_namespace), ("key_name", key_name)):
        if len(value.encode("utf-8", "surrogatepass")) > 0xFFFF:
            raise ConfigurationError(f"{what} is longer than 65535 bytes")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigurationError(f"{what} is not encodable as UTF-8") from None
