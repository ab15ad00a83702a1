"""The default materials manager: the ESDK default CMM's rules around a keyring.

It chooses and polices the suite, adds the signing key for signing suites, handles the
reproduced/required encryption context, and checks what keyrings return. The key
manager of a later issue (caching, coalescing, limits) wraps this same interface.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass

from .errors import (
    CommitmentPolicyError,
    ConfigurationError,
    EncryptionContextError,
    EncryptionContextMismatchError,
    KeyringError,
    MalformedMessageError,
    MessageLimitError,
    NoUsableKeyError,
)
from .format.encryption_context import (
    PUBLIC_KEY_FIELD,
    serialize_encryption_context,
    validate_user_context,
)
from .format.header import MessageHeader, stored_context_bytes
from .format.signing import Signer, Verifier
from .format.suites import AlgorithmSuite, CommitmentPolicy
from .keyrings.base import (
    DecryptionMaterials,
    EncryptionMaterials,
    Keyring,
    _frozen,
    describe_encrypted_data_keys,
)

__all__ = ["WRITABLE_SUITES", "DecryptionPlan", "DefaultMaterialsManager", "EncryptionPlan"]

WRITABLE_SUITES = frozenset(
    {
        AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY,
        AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384,
    }
)
DEFAULT_SUITE = AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY


@dataclass(frozen=True)
class EncryptionPlan:
    materials: EncryptionMaterials
    signer: Signer | None

    @property
    def stored_context(self) -> Mapping[str, str]:
        """The pairs written into the header: all but the required-only ones."""
        context = self.materials.encryption_context
        required = self.materials.required_encryption_context_keys
        if not required:
            return context
        return {k: v for k, v in context.items() if k not in required}

    @property
    def required_context(self) -> Mapping[str, str]:
        """The pairs authenticated through the header tag but not stored."""
        required = self.materials.required_encryption_context_keys
        if not required:  # the usual case: no comprehension over the context
            return {}
        return {k: v for k, v in self.materials.encryption_context.items() if k in required}

    @property
    def serialized_stored_context(self) -> bytes | None:
        """The stored context's serialization when it is already known."""
        if self.materials.required_encryption_context_keys:
            return None
        return self.materials.serialized_encryption_context


@dataclass(frozen=True)
class DecryptionPlan:
    materials: DecryptionMaterials
    verifier: Verifier | None

    @property
    def data_key(self) -> bytes:
        assert self.materials.plaintext_data_key is not None
        return self.materials.plaintext_data_key

    @property
    def required_context(self) -> dict[str, str]:
        return required_pairs(self.materials)


def required_pairs(materials: DecryptionMaterials) -> dict[str, str]:
    """The pairs authenticated through the header tag but not stored in it."""
    required = materials.required_encryption_context_keys
    if not required:  # the usual case: no comprehension over the context
        return {}
    return {k: v for k, v in materials.encryption_context.items() if k in required}


def decryption_plan_of(materials: DecryptionMaterials, verifier: Verifier | None) -> DecryptionPlan:
    """``DecryptionPlan(materials, verifier)`` without the frozen dataclass's
    per-field setattr (once per message decrypted; both fields are already checked)."""
    plan: DecryptionPlan = object.__new__(DecryptionPlan)
    plan.__dict__.update(materials=materials, verifier=verifier)
    return plan


_NOTHING_REQUIRED: frozenset[str] = frozenset()


class DefaultMaterialsManager:
    def __init__(
        self,
        keyring: Keyring,
        *,
        commitment_policy: CommitmentPolicy,
        max_encrypted_data_keys: int,
    ) -> None:
        self.keyring = keyring
        self.commitment_policy = commitment_policy
        self.max_encrypted_data_keys = max_encrypted_data_keys

    def choose_suite(self, requested: AlgorithmSuite | None) -> AlgorithmSuite:
        policy = self.commitment_policy
        if (
            requested is DEFAULT_SUITE
            and policy is not CommitmentPolicy.FORBID_ENCRYPT_ALLOW_DECRYPT
        ):
            return DEFAULT_SUITE  # the usual case, which every check below passes
        if policy is CommitmentPolicy.FORBID_ENCRYPT_ALLOW_DECRYPT:
            raise CommitmentPolicyError(
                "this client's policy FORBID_ENCRYPT_ALLOW_DECRYPT forbids key-committing "
                "suites, and aioenvelope writes only those: use it to read legacy messages, "
                "and REQUIRE_ENCRYPT_ALLOW_DECRYPT to write"
            )
        suite = requested or DEFAULT_SUITE
        if not isinstance(suite, AlgorithmSuite):
            raise ConfigurationError(f"algorithm_suite must be an AlgorithmSuite, not {suite!r}")
        if suite not in WRITABLE_SUITES:
            raise ConfigurationError(
                f"{suite.name} is readable but not writable: aioenvelope writes only "
                "AES_256_GCM_HKDF_SHA512_COMMIT_KEY and "
                "AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384"
            )
        return suite

    async def encryption_plan(
        self,
        *,
        encryption_context: Mapping[str, str],
        algorithm_suite: AlgorithmSuite | None,
        required_encryption_context_keys: Set[str] = frozenset(),
    ) -> EncryptionPlan:
        validate_user_context(encryption_context)
        if required_encryption_context_keys:
            missing = set(required_encryption_context_keys) - set(encryption_context)
            if missing:
                raise EncryptionContextError(
                    f"required encryption context keys {sorted(missing)!r} are not in the "
                    "encryption context"
                )
        suite = self.choose_suite(algorithm_suite)
        context = dict(encryption_context)
        signer = None
        if suite.signing:
            signer = Signer(suite)
            context[PUBLIC_KEY_FIELD] = signer.encoded_public_key
        materials = EncryptionMaterials._of_own_copy(
            suite, context, frozenset(required_encryption_context_keys)
        )
        result = await self.keyring.on_encrypt(materials)
        if result.plaintext_data_key is None or not result.encrypted_data_keys:
            raise KeyringError(
                f"{self.keyring!r} returned no data key or no encrypted data key on encrypt"
            )
        if result.algorithm_suite is not suite or (
            result.encryption_context is not materials.encryption_context
            and dict(result.encryption_context) != context
        ):
            raise KeyringError(f"{self.keyring!r} changed the suite or encryption context")
        if len(result.encrypted_data_keys) > self.max_encrypted_data_keys:
            raise MessageLimitError(
                f"the keyring produced {len(result.encrypted_data_keys)} encrypted data keys, "
                f"more than max_encrypted_data_keys={self.max_encrypted_data_keys}"
            )
        # As EncryptionPlan(...) makes it, without the frozen __init__'s setattrs.
        plan: EncryptionPlan = object.__new__(EncryptionPlan)
        plan.__dict__.update(materials=result, signer=signer)
        return plan

    def check_policy(self, header: MessageHeader) -> None:
        suite = header.algorithm_suite
        if not self.commitment_policy.allows_decrypt(suite):
            raise CommitmentPolicyError(
                f"the message uses {suite.name}, which does not commit to its key; this "
                f"client's policy {self.commitment_policy.name} refuses it. To read legacy "
                "messages, use CommitmentPolicy.REQUIRE_ENCRYPT_ALLOW_DECRYPT"
            )

    async def decryption_materials(
        self,
        header: MessageHeader,
        context: Mapping[str, str],
        required: frozenset[str],
        serialized_context: bytes | None = None,
    ) -> DecryptionMaterials:
        """Ask the keyring for the data key (the part worth caching).

        ``serialized_context``, when given, must be :func:`decryption_context_bytes` of
        the same arguments (a caller that needed it already passes it on). Else the
        header's own bytes serve when they are that; nothing is serialized here that a
        keyring might never ask for."""
        # As DecryptionMaterials(...) makes them (its __post_init__ freezes the context:
        # a read-only view, such as the header's own, is kept as it is), without the
        # frozen dataclass's per-field setattr.
        materials: DecryptionMaterials = object.__new__(DecryptionMaterials)
        materials.__dict__.update(
            algorithm_suite=header.algorithm_suite,
            encryption_context=_frozen(context),
            plaintext_data_key=None,
            required_encryption_context_keys=required,
        )
        if serialized_context is None and not required:
            serialized_context = header._serialized_context
        if serialized_context is not None:
            materials._known_serialization(serialized_context)
        try:
            result = await self.keyring.on_decrypt(materials, header.encrypted_data_keys)
        except NoUsableKeyError as exc:
            _name_the_message_keys(exc, header)
            raise
        if result.plaintext_data_key is None:
            raise KeyringError(f"{self.keyring!r} returned no data key on decrypt")
        return result


def _name_the_message_keys(error: NoUsableKeyError, header: MessageHeader) -> None:
    """End ``error``'s text with the keys the message's EDKs name, once for whichever
    keyring (a ``MultiKeyring``'s children each say only what they have and why it
    failed). The error itself is kept: its type, chained cause and traceback."""
    if len(error.args) != 1 or not isinstance(error.args[0], str):
        return  # a custom keyring's own error shape: leave it alone
    tail = (
        f". The message carries encrypted data keys for: "
        f"{describe_encrypted_data_keys(header.encrypted_data_keys)}"
    )
    if not error.args[0].endswith(tail):  # a keyring re-raising one error object
        error.args = (error.args[0].rstrip(".") + tail,)


def decryption_context_bytes(
    header: MessageHeader, context: Mapping[str, str], required: frozenset[str]
) -> bytes:
    """The serialization of ``context``, as :func:`merge_reproduced_context` made it
    from ``header``: with no required pairs it holds just the header's pairs, whose
    serialization the header usually has already (no per-message serialization)."""
    if required:
        return serialize_encryption_context(context)
    return stored_context_bytes(header)


def merge_reproduced_context(
    header: MessageHeader, reproduced: Mapping[str, str] | None
) -> tuple[Mapping[str, str], frozenset[str]]:
    """The decryption context: the stored pairs, plus reproduced pairs the header does not
    store (those are required context, authenticated through the header tag).

    When every reproduced pair is stored (the usual case) that is the header's own
    read-only context, not a copy: nothing is built per message."""
    stored = header.encryption_context
    if reproduced is None or (type(reproduced) is dict and reproduced == stored):
        # No pairs, or exactly the stored ones (the commonest call): one comparison in C
        # instead of a loop. A plain dict only, so no caller code runs in the comparison.
        return stored, _NOTHING_REQUIRED
    context: dict[str, str] | None = None
    for key, value in reproduced.items():
        if key in stored:
            if stored[key] != value:
                raise EncryptionContextMismatchError(
                    f"encryption context value for key {key!r} does not match the message"
                )
        else:
            if context is None:
                context = dict(stored)
            context[key] = value
    if context is None:
        return stored, _NOTHING_REQUIRED
    return context, frozenset(context.keys() - stored.keys())


def verifier_for(header: MessageHeader, context: Mapping[str, str]) -> Verifier | None:
    """The signature verifier of a signing suite (from ``aws-crypto-public-key``)."""
    suite = header.algorithm_suite
    public_key = context.get(PUBLIC_KEY_FIELD)
    if suite.signing:
        if public_key is None:
            raise MalformedMessageError(
                f"signing suite {suite.name} but no {PUBLIC_KEY_FIELD} in the context"
            )
        return Verifier(suite, public_key)
    if public_key is not None:
        raise MalformedMessageError(
            f"{PUBLIC_KEY_FIELD} in the context of a message whose suite does not sign"
        )
    return None
