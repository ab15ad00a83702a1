"""The library's messages in the command line's words.

The library's errors give Python advice (``check_keys=False``, ``region_name``,
``decrypt_stream(allow_signed=False)``, ``EnvelopeClient.reencrypt_stream``, the Vault
keyring's ``url=``, ``token=`` and ``mount=``, the Cloud KMS keyring's ``credentials=``,
the Key Vault keyring's ``credential=`` and ``client_options=``); on the
command line the same advice is a flag or a command. Each rule below rewrites one piece
of Python advice wherever it appears in a library error, so the rest of the message (what
went wrong, which key, which file) stays the library's, whatever its wording around it.
A piece of advice with no command-line equivalent (``decrypt()``, which buffers a whole
message) is dropped rather than shown.
"""

from __future__ import annotations

import re

__all__ = ["in_cli_words"]

_REENCRYPT = "`aioenvelope reencrypt`"

_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        # Signed messages: --unsigned-only refuses them, --allow-signed (the default) reads.
        (r"\bdecrypt_stream\((?:\.\.\.,\s*)?allow_signed=False\)", "--unsigned-only"),
        (r"\ballow_signed=False\b", "--unsigned-only"),
        (r"\bPass allow_signed=True\b", "Leave out --unsigned-only"),
        (r"\bpass allow_signed=True\b", "leave out --unsigned-only"),
        (r"\ballow_signed=True\b", "--allow-signed"),
        (r"[,;]?\s*or use decrypt\(\)[^.;]*", ""),
        # KMS keys checked with DescribeKey on start, Vault keys read on start.
        (r"\bcheck_keys=False\b", "--no-check-keys"),
        # Vault transit keys: the server, the token, the mount.
        (r"\bgive url= \(", "give --vault-url URL ("),
        (r"\burl=(?=[\s),])", "--vault-url"),
        (r"\bthe Vault url\b", "the Vault URL (--vault-url)"),
        (
            r"\bgive token=, auth=AppRoleAuth\([^)]*\), or set VAULT_TOKEN\b",
            "give --vault-token-file FILE or set VAULT_TOKEN (or BAO_TOKEN)",
        ),
        (r"\btoken=(?=[\s),])", "--vault-token-file"),
        (r"\bmount=(?=[\s),])", "--vault-mount"),
        # A 403 is a policy's denial or a token the server does not know (Vault cannot
        # say which): where the command line's token comes from.
        (
            r"\bthe token is not valid \(expired, revoked or mistyped",
            "the token is not valid (check VAULT_TOKEN or --vault-token-file; expired, "
            "revoked or mistyped",
        ),
        (
            r"\bthe token must be valid \(not expired or revoked\)",
            "the token must be valid (not expired or revoked; check VAULT_TOKEN or "
            "--vault-token-file)",
        ),
        (
            r"\b(?:EnvelopeClient\.|client\.)reencrypt to the same keyring\b",
            "`aioenvelope reencrypt` with --to-vault-key naming the same key",
        ),
        # Google Cloud KMS: credentials are Application Default Credentials only.
        (r"\brun on Google Cloud, or pass credentials=", "or run on Google Cloud"),
        # Azure Key Vault: the default credential, the challenge check, the extra.
        (r"\bcheck credential= \(by default ", "check the credential ("),
        (
            r"\bclient_options=\{'verify_challenge_resource': False\}",
            "--azure-no-challenge-resource-check",
        ),
        # (azure-keyvault-keys' own words for the same advice, quoted in the error.)
        (
            r"\s*Pass `verify_challenge_resource=False` to your client's constructor to "
            r"disable this verification\.",
            "",
        ),
        (
            r"\bno credential= given and azure-identity is not installed: pip install "
            r"'aioenvelope\[azure\]', or pass an async credential\b",
            "azure-identity is not installed: pip install 'aioenvelope[azure]'",
        ),
        # Where KMS (and a key store's table) is.
        (r"\bregion_name\b=?", "--region"),
        (r"\bset AWS_REGION\b(?! or AWS_DEFAULT_REGION)", "set AWS_REGION or AWS_DEFAULT_REGION"),
        (r"\bendpoint_url\b", "--endpoint-url"),
        (r"\(AWS_PROFILE\b", "(--profile, AWS_PROFILE"),
        (r"\s*or regions=\[\.\.\.\]", ""),
        (r"\b[Aa] KmsDiscoveryKeyring\b", "--discovery"),
        (
            r"list every region your keys live in with KmsDiscoveryKeyring\(regions=\[\.\.\.\]\)",
            "name those keys with --kms-key ARN",
        ),
        # Re-encryption and legacy messages.
        (r"\b(?:EnvelopeClient\.|client\.)?reencrypt(?:_stream|_file)?\(\)", _REENCRYPT),
        (r"\b(?:EnvelopeClient\.|client\.)?reencrypt_(?:stream|file)\b", _REENCRYPT),
        (
            r"\b(?:commitment_policy=)?CommitmentPolicy\.REQUIRE_ENCRYPT_ALLOW_DECRYPT\b",
            "--commitment-policy require-encrypt-allow-decrypt",
        ),
        # Output files and key stores.
        (r"\boverwrite=True\b", "--force"),
        (r"\bcreate_table\(\)", "`aioenvelope branch-key create-table`"),
        (r"\btable_name\b", "--key-store-table"),
        # Limits the command line does not expose: say the limit, not a parameter.
        (r"\s*\(raise max_encrypted_data_keys[^)]*\)", ""),
        (r"\blower max_encrypted_data_keys, or ", ""),
        (r"\bmore than max_encrypted_data_keys=(\d+)", r"more than the \1 a message may carry"),
    )
)


def in_cli_words(text: str) -> str:
    """``text`` (a library error's message) with its Python advice in CLI terms."""
    for pattern, replacement in _RULES:
        text = pattern.sub(replacement, text)
    return text
