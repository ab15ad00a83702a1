"""AWS KMS keyrings on aioboto3: strict (named keys), discovery, and multi-Region aware.

EDKs follow the ESDK: provider ID ``aws-kms``, provider info the key ARN KMS returned,
ciphertext KMS's ``CiphertextBlob``. The full encryption context goes to KMS on every
call, so KMS (and CloudTrail) authenticate it too.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import aioboto3
from botocore.exceptions import InvalidRegionError
from botocore.utils import validate_region_name

from .._concurrency import gather_in_order
from ..errors import (
    CircuitOpenError,
    ConfigurationError,
    KeyringError,
    KMSError,
    KMSKeyCheckError,
    NoUsableKeyError,
)
from ..format.header import EncryptedDataKey
from .base import DecryptionMaterials, EncryptionMaterials, Keyring
from .kms_arn import KmsArn, mrk_match, parse_arn
from .kms_clients import CREDENTIAL_ERROR_CODES, KmsClients, KmsSettings

if TYPE_CHECKING:
    from ..runtime import Runtime

__all__ = ["DiscoveryFilter", "KmsDiscoveryKeyring", "KmsKeyring"]

PROVIDER_ID = "aws-kms"


@dataclass(frozen=True)
class DiscoveryFilter:
    """Limit discovery to keys of these accounts in this partition."""

    account_ids: Collection[str]
    partition: str = "aws"

    def __post_init__(self) -> None:
        if isinstance(self.account_ids, str) or not self.account_ids:
            raise ConfigurationError("DiscoveryFilter needs a non-empty collection of account IDs")
        object.__setattr__(self, "account_ids", frozenset(self.account_ids))
        if not self.partition:
            raise ConfigurationError("DiscoveryFilter needs a partition (e.g. 'aws')")

    def allows(self, arn: KmsArn) -> bool:
        return arn.partition == self.partition and arn.account in self.account_ids


def _edk_arn(edk: EncryptedDataKey) -> KmsArn | None:
    """The key ARN an ``aws-kms`` EDK names, or None if it is not one (then skip it)."""
    if edk.provider_id != PROVIDER_ID:
        return None
    try:
        arn = parse_arn(edk.provider_info.decode("utf-8"))
    except UnicodeDecodeError:
        return None
    return arn if arn is not None and arn.resource_type == "key" else None


def _checked_regions(regions: Collection[str]) -> frozenset[str]:
    """``regions`` as a set, each a well-formed region name, or a ConfigurationError."""
    if isinstance(regions, str) or not isinstance(regions, Collection) or not regions:
        raise ConfigurationError(
            "regions must be a non-empty collection of AWS region names, "
            "e.g. regions=['us-east-1', 'eu-west-1']"
        )
    for region in regions:
        problem = not isinstance(region, str) or not region.isascii() or not region.isprintable()
        if not problem:
            try:
                validate_region_name(region)
            except InvalidRegionError:
                problem = True
        if problem or not region:
            raise ConfigurationError(
                f"{region!r} is not an AWS region name (such as 'eu-west-1'); check regions= "
                "and region_name"
            )
    return frozenset(regions)


def _shown(regions: Collection[str], limit: int = 5) -> str:
    """Region names for an error message. They may come from a message's EDKs, i.e. from
    whoever wrote it: quoted (so control characters show escaped), cut short, few."""
    names = [repr(region[:64]) for region in list(regions)[:limit]]
    more = f" and {len(regions) - limit} more" if len(regions) > limit else ""
    return ", ".join(names) + more


def _check_response_key(response: Mapping[str, Any], operation: str, key_id: str) -> str:
    returned = response.get("KeyId")
    arn = parse_arn(returned) if isinstance(returned, str) else None
    if arn is None or arn.resource_type != "key":
        raise KMSError(
            f"KMS {operation} with key {key_id} returned no valid key ARN",
            operation=operation,
            key_id=key_id,
            error_code="InvalidResponse",
            transient=False,
        )
    return str(returned)


def _check_plaintext(
    response: Mapping[str, Any], length: int, operation: str, key_id: str
) -> bytes:
    plaintext = response.get("Plaintext")
    if not isinstance(plaintext, (bytes, bytearray)) or len(plaintext) != length:
        raise KMSError(
            f"KMS {operation} with key {key_id} returned a data key of the wrong length",
            operation=operation,
            key_id=key_id,
            error_code="InvalidResponse",
            transient=False,
        )
    return bytes(plaintext)


class _KmsKeyringBase(Keyring):
    @property
    def _description(self) -> str:
        """The keyring and its keys, for error messages (no repr: that is for Python)."""
        raise NotImplementedError

    def __init__(self, settings: KmsSettings, grant_tokens: Sequence[str]) -> None:
        self._clients = KmsClients(settings)
        self._grant_tokens = list(grant_tokens)

    @property
    def kms_calls(self) -> Mapping[str, int]:
        """KMS calls made so far, by operation (attempts as seen by us, not retries)."""
        return dict(self._clients.calls)

    def attach(self, runtime: Runtime) -> None:
        self._clients.runtime = runtime

    async def open(self) -> None:
        await self._clients.open()

    async def close(self) -> None:
        await self._clients.close()

    async def _decrypt_one(
        self,
        materials: DecryptionMaterials,
        edk: EncryptedDataKey,
        key_id: str,
        region: str,
        expect: str | None,
    ) -> DecryptionMaterials:
        params = {
            "KeyId": key_id,
            "CiphertextBlob": edk.ciphertext,
            "EncryptionContext": dict(materials.encryption_context),
            "GrantTokens": self._grant_tokens,
        }
        # A refusal is an answer here: the message may carry keys not meant for us.
        response = await self._clients.call("Decrypt", region, key_id, params, expected=None)
        returned = _check_response_key(response, "Decrypt", key_id)
        if expect is not None and returned != expect:
            raise KMSError(
                f"KMS Decrypt with key {key_id} answered for {returned}, not {expect}",
                operation="Decrypt",
                key_id=key_id,
                error_code="UnexpectedKey",
                transient=False,
            )
        length = materials.algorithm_suite.key_length
        return materials.with_data_key(_check_plaintext(response, length, "Decrypt", key_id))

    async def _try_in_order(
        self,
        materials: DecryptionMaterials,
        attempts: Sequence[tuple[EncryptedDataKey, str, str, str | None]],
        total_edks: int,
        skipped: str = "",
    ) -> DecryptionMaterials:
        """Try each (edk, key, region, expected ARN) in turn; the first success wins.

        ``skipped`` explains EDKs left out before any call (it ends the final error).

        A region whose circuit breaker is open is skipped, not fatal: a message wrapped
        in two regions must still decrypt while one of them is down.
        """
        failures: list[KMSError] = []
        refused: list[CircuitOpenError] = []
        for edk, key_id, region, expect in attempts:
            try:
                return await self._decrypt_one(materials, edk, key_id, region, expect)
            except KMSError as exc:
                failures.append(exc)
            except CircuitOpenError as exc:
                refused.append(exc)
        if refused and all(f.transient for f in failures):
            # Nothing answered: KMS is down where we could have asked. A 503, not a 4xx.
            raise min(refused, key=lambda exc: exc.retry_after)
        transient = [f for f in failures if f.transient]
        if transient and len(transient) == len(failures):
            # Every try failed for want of KMS: an outage, not a wrong key. Say so.
            raise transient[-1]
        reasons = "; ".join(str(f) for f in failures) or "no encrypted data key names a usable key"
        raise NoUsableKeyError(
            f"{self._description} could not decrypt any of the message's {total_edks} "
            "encrypted data "
            f"keys ({len(attempts)} tried): {reasons}{skipped}"
        )


class KmsKeyring(_KmsKeyringBase):
    """Encrypts under ``generator`` (and ``additional_key_ids``); decrypts only EDKs made
    under one of those keys.

    Keys may be given as key ID, key ARN, alias name or alias ARN. On open (when the
    ``EnvelopeClient`` is entered) each key is checked once with DescribeKey, unless
    ``check_keys=False``; that also learns each key's ARN for matching EDKs.
    With ``mrk_aware=True``, replicas of a multi-Region key in other regions count as
    the same key, and are decrypted with the configured key in its own region.
    """

    def __init__(
        self,
        generator: str,
        *,
        additional_key_ids: Sequence[str] = (),
        client: Any = None,
        session: aioboto3.Session | None = None,
        region_name: str | None = None,
        endpoint_url: str | None = None,
        grant_tokens: Sequence[str] = (),
        mrk_aware: bool = False,
        check_keys: bool = True,
        deadline: float = 2.0,
        retry_mode: str = "standard",
        max_attempts: int = 4,
        max_connections: int = 32,
    ) -> None:
        keys = [generator, *additional_key_ids]
        if not all(isinstance(k, str) and k for k in keys):
            raise ConfigurationError("KMS key identifiers must be non-empty strings")
        if isinstance(additional_key_ids, str):
            raise ConfigurationError("additional_key_ids must be a sequence of key identifiers")
        if len(set(keys)) != len(keys):
            raise ConfigurationError("the same KMS key is named twice")
        settings = KmsSettings(
            client=client,
            session=session,
            region_name=region_name,
            endpoint_url=endpoint_url,
            deadline=deadline,
            retry_mode=retry_mode,
            max_attempts=max_attempts,
            max_connections=max_connections,
        )
        super().__init__(settings, grant_tokens)
        self.generator = generator
        self.additional_key_ids = tuple(additional_key_ids)
        self.mrk_aware = mrk_aware
        self.check_keys = check_keys
        # Configured identifier -> key ARN, from the ARN itself or from DescribeKey.
        self._arns: dict[str, str] = {}
        for key in keys:
            arn = parse_arn(key)
            if arn is not None and arn.resource_type == "key":
                self._arns[key] = key

    def __repr__(self) -> str:
        extra = (
            f", additional_key_ids={list(self.additional_key_ids)!r}"
            if self.additional_key_ids
            else ""
        )
        return f"KmsKeyring({self.generator!r}{extra})"

    @property
    def key_ids(self) -> tuple[str, ...]:
        return (self.generator, *self.additional_key_ids)

    @property
    def _description(self) -> str:
        keys = []
        for key in self.key_ids:
            arn = self._arns.get(key)
            keys.append(key if arn in (None, key) else f"{key} ({arn})")
        return f"the KMS keyring with key{'s' if len(keys) > 1 else ''} {', '.join(keys)}"

    def _region(self, key_id: str) -> str:
        arn = parse_arn(self._arns.get(key_id, key_id))
        return self._clients.region_for(key_id, arn.region if arn else None)

    async def open(self) -> None:
        await super().open()
        try:
            for key in self.key_ids:
                self._region(key)  # fail now on a key with no region
            if self.check_keys:
                await gather_in_order([partial(self._check_key, key) for key in self.key_ids])
        except BaseException:
            await super().close()
            raise

    async def _check_key(self, key_id: str) -> None:
        try:
            response = await self._clients.call(
                "DescribeKey",
                self._region(key_id),
                key_id,
                {"KeyId": key_id, "GrantTokens": self._grant_tokens},
            )
        except KMSError as exc:
            if exc.transient or exc.error_code in CREDENTIAL_ERROR_CODES:
                # KMS is unreachable or throttling (an outage), or nothing was sent for
                # want of credentials: either way the key was not checked, and its own
                # message says so better than "failed the start-up check" would.
                raise
            what = {
                "AccessDeniedException": "the caller lacks kms:DescribeKey on it",
                "NotFoundException": "it does not exist in this account and region",
            }.get(exc.error_code, f"DescribeKey failed with {exc.error_code}")
            raise KMSKeyCheckError(
                f"KMS key {key_id!r} failed the start-up check: {what}. Fix the key or the "
                "permissions, or pass check_keys=False to skip this check"
            ) from exc
        meta = response.get("KeyMetadata", {})
        problems = []
        if meta.get("KeyState", "Enabled") != "Enabled" or meta.get("Enabled") is False:
            problems.append(f"its state is {meta.get('KeyState', 'Disabled')}, not Enabled")
        if meta.get("KeyUsage", "ENCRYPT_DECRYPT") != "ENCRYPT_DECRYPT":
            problems.append(f"its usage is {meta.get('KeyUsage')}, not ENCRYPT_DECRYPT")
        spec = meta.get("KeySpec") or meta.get("CustomerMasterKeySpec") or "SYMMETRIC_DEFAULT"
        if spec != "SYMMETRIC_DEFAULT":
            problems.append(f"it is a {spec} key, not a symmetric encryption key")
        if problems:
            raise KMSKeyCheckError(f"KMS key {key_id!r} cannot be used: " + "; ".join(problems))
        if isinstance(meta.get("Arn"), str):
            self._arns[key_id] = meta["Arn"]

    async def on_encrypt(self, materials: EncryptionMaterials) -> EncryptionMaterials:
        context = dict(materials.encryption_context)
        length = materials.algorithm_suite.key_length
        if materials.plaintext_data_key is None:
            key = self.generator
            response = await self._clients.call(
                "GenerateDataKey",
                self._region(key),
                key,
                {
                    "KeyId": key,
                    "NumberOfBytes": length,
                    "EncryptionContext": context,
                    "GrantTokens": self._grant_tokens,
                },
            )
            arn = _check_response_key(response, "GenerateDataKey", key)
            data_key = _check_plaintext(response, length, "GenerateDataKey", key)
            materials = materials.with_data_key(data_key).with_encrypted_data_key(
                EncryptedDataKey(
                    PROVIDER_ID, arn.encode("utf-8"), bytes(response["CiphertextBlob"])
                )
            )
            wrap_keys: Sequence[str] = self.additional_key_ids
        else:
            wrap_keys = self.key_ids
        assert materials.plaintext_data_key is not None
        data_key = materials.plaintext_data_key

        async def wrap(key: str) -> EncryptedDataKey:
            response = await self._clients.call(
                "Encrypt",
                self._region(key),
                key,
                {
                    "KeyId": key,
                    "Plaintext": data_key,
                    "EncryptionContext": context,
                    "GrantTokens": self._grant_tokens,
                },
            )
            arn = _check_response_key(response, "Encrypt", key)
            return EncryptedDataKey(
                PROVIDER_ID, arn.encode("utf-8"), bytes(response["CiphertextBlob"])
            )

        # In parallel, not one after another: each is a KMS round trip.
        for edk in await gather_in_order([partial(wrap, key) for key in wrap_keys]):
            materials = materials.with_encrypted_data_key(edk)
        return materials

    def _matches(self, key_id: str, edk_arn: KmsArn) -> bool:
        known = self._arns.get(key_id)
        if known is not None:
            return mrk_match(known, str(edk_arn)) if self.mrk_aware else known == str(edk_arn)
        # Not resolved (check_keys=False and not a key ARN). A bare key ID matches by its
        # resource ID. An alias cannot be compared here: KMS decides (it refuses a blob
        # made under another key) and the ARN in its answer is checked.
        arn = parse_arn(key_id)
        if key_id.startswith("alias/") or (arn is not None and arn.resource_type == "alias"):
            return True
        return edk_arn.resource_id == key_id

    async def on_decrypt(
        self, materials: DecryptionMaterials, encrypted_data_keys: Sequence[EncryptedDataKey]
    ) -> DecryptionMaterials:
        if materials.plaintext_data_key is not None:
            return materials
        attempts = []
        for edk in encrypted_data_keys:
            edk_arn = _edk_arn(edk)
            if edk_arn is None:
                continue
            for key in self.key_ids:
                if self._matches(key, edk_arn):
                    known = self._arns.get(key)
                    if self.mrk_aware and known is not None:
                        expect: str | None = known  # the replica in the configured region
                    else:
                        expect = str(edk_arn)
                    attempts.append((edk, known or key, self._region(key), expect))
                    break
        return await self._try_in_order(materials, attempts, len(encrypted_data_keys))


class KmsDiscoveryKeyring(_KmsKeyringBase):
    """Decrypt-only: tries every ``aws-kms`` EDK under the key it names.

    ``discovery_filter`` limits that to some accounts of one partition (recommended).
    ``regions`` limits it to keys in those regions: the region is part of the EDK, which
    whoever wrote the message chose, and each region costs a KMS client and a circuit
    breaker. It defaults to the keyring's home region (``region_name``, else the
    ``client``'s or ``session``'s region, ``AWS_REGION`` or ``AWS_DEFAULT_REGION``); list
    every region your keys live in to widen it. EDKs of other regions are skipped without
    a call, like EDKs of unknown keys, and the final error names them.
    With ``mrk_aware=True`` (which needs a home region and no other ``regions``),
    multi-Region keys from other regions are decrypted by their replica in the home
    region; other keys from other regions are skipped, so decryption stays in one region.
    """

    def __init__(
        self,
        *,
        discovery_filter: DiscoveryFilter | None = None,
        client: Any = None,
        session: aioboto3.Session | None = None,
        region_name: str | None = None,
        endpoint_url: str | None = None,
        grant_tokens: Sequence[str] = (),
        mrk_aware: bool = False,
        regions: Collection[str] | None = None,
        deadline: float = 2.0,
        retry_mode: str = "standard",
        max_attempts: int = 4,
        max_connections: int = 32,
    ) -> None:
        if discovery_filter is not None and not isinstance(discovery_filter, DiscoveryFilter):
            raise ConfigurationError("discovery_filter must be a DiscoveryFilter")
        settings = KmsSettings(
            client=client,
            session=session,
            region_name=region_name,
            endpoint_url=endpoint_url,
            deadline=deadline,
            retry_mode=retry_mode,
            max_attempts=max_attempts,
            max_connections=max_connections,
        )
        home = settings.default_region()
        if mrk_aware and not home:
            raise ConfigurationError("an MRK-aware discovery keyring needs a region_name")
        if regions is None:
            if not home:
                raise ConfigurationError(
                    "a KmsDiscoveryKeyring needs to know which regions it may call KMS in: "
                    "give region_name= (its home region) or regions=[...], or set AWS_REGION"
                )
            regions = (home,)
        allowed = _checked_regions(regions)
        if mrk_aware and allowed != {home}:
            raise ConfigurationError(
                "an MRK-aware discovery keyring calls KMS only in its home region "
                f"({home!r}): leave regions= out, or use mrk_aware=False"
            )
        super().__init__(settings, grant_tokens)
        self.discovery_filter = discovery_filter
        self.mrk_aware = mrk_aware
        self.regions = allowed
        self._home = home

    def __repr__(self) -> str:
        return (
            f"KmsDiscoveryKeyring(discovery_filter={self.discovery_filter!r}, "
            f"regions={sorted(self.regions)!r})"
        )

    @property
    def _description(self) -> str:
        where = "in " + ", ".join(sorted(self.regions))
        found = self.discovery_filter
        if found is not None:
            accounts = ", ".join(sorted(found.account_ids))
            where += f", accounts {accounts} of partition {found.partition}"
        return f"the KMS discovery keyring (keys {where})"

    def _skipped_note(self, refused: Collection[str]) -> str:
        if not refused:
            return ""
        note = (
            f"; skipped encrypted data keys naming keys in regions this keyring may not "
            f"call: {_shown(refused)}. "
        )
        if self.mrk_aware:
            return note + (
                f"An MRK-aware discovery keyring calls KMS only in its home region "
                f"{self._home!r}, for multi-Region keys and keys of that region"
            )
        return note + (
            f"It calls KMS only in {_shown(sorted(self.regions), limit=50)}; if keys in "
            "other regions should open messages, list every region your keys live in "
            "with KmsDiscoveryKeyring(regions=[...])"
        )

    async def on_encrypt(self, materials: EncryptionMaterials) -> EncryptionMaterials:
        raise KeyringError(
            "a KmsDiscoveryKeyring only decrypts; encrypt with a KmsKeyring that names a key"
        )

    async def on_decrypt(
        self, materials: DecryptionMaterials, encrypted_data_keys: Sequence[EncryptedDataKey]
    ) -> DecryptionMaterials:
        if materials.plaintext_data_key is not None:
            return materials
        attempts = []
        refused: dict[str, None] = {}  # regions not allowed, in order of appearance
        for edk in encrypted_data_keys:
            arn = _edk_arn(edk)
            if arn is None:
                continue
            if self.discovery_filter is not None and not self.discovery_filter.allows(arn):
                continue
            if self.mrk_aware and self._home and arn.is_mrk:
                arn = arn.in_region(self._home)  # its replica, in the one allowed region
            elif arn.region not in self.regions:
                # Never a client, a breaker or a call for a region the writer picked.
                refused.setdefault(arn.region, None)
                continue
            attempts.append((edk, str(arn), arn.region, str(arn)))
        return await self._try_in_order(
            materials, attempts, len(encrypted_data_keys), self._skipped_note(refused)
        )
