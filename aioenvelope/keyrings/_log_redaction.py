"""Keep data keys out of botocore's DEBUG logs while our KMS clients are open.

At DEBUG, botocore logs every request it makes (``botocore.endpoint``: "Making request
... with params", the serialized body included) and every response body
(``botocore.parsers``: "Response body"); aiobotocore logs through the same loggers. For
KMS those bodies carry ``Plaintext``: the data key, base64-encoded (Encrypt requests,
GenerateDataKey and Decrypt responses). An application that turns on DEBUG to chase a
connection problem would write its data keys to its logs.

While at least one KMS keyring is open, :class:`KeyMaterialFilter` sits on botocore's
and aiobotocore's loggers and rewrites any record that names a ``*Plaintext*`` field so
that its value reads ``[redacted by aioenvelope]``; a record it cannot take apart is
withheld whole (its text replaced) rather than let through. ``CiphertextBlob`` is left
alone: it is the encrypted data key, which every message header carries in clear.

Filters on a logger apply only to records logged *on that logger* (not to records that
propagate from its children), so the filter goes on each logger by name: the ones known
to log bodies, plus every botocore, aiobotocore, boto3 and aioboto3 logger that exists
when the first keyring opens. It is reference-counted across keyrings (and event loops,
hence the lock) and removed when the last one closes, so nothing of ours lingers on
loggers the application owns. Other botocore clients in the process are redacted too
while ours are open; that only ever removes key material.
"""

from __future__ import annotations

import logging
import re
import threading

__all__ = ["KeyMaterialFilter", "redaction_active", "release_redaction", "retain_redaction"]

REDACTED = "[redacted by aioenvelope]"
WITHHELD = (
    "[botocore log record withheld by aioenvelope: it names a Plaintext field whose value "
    "could not be isolated, and may carry key material]"
)
_SENSITIVE = "Plaintext"  # Plaintext, PrivateKeyPlaintext, ...: every KMS field with a key
# The loggers that log request or response bodies (aiobotocore reuses botocore's).
_KNOWN_LOGGERS = (
    "botocore.endpoint",
    "botocore.parsers",
    "botocore.hooks",
    "botocore.auth",
    "botocore.client",
    "botocore.retryhandler",
    "botocore.httpchecksum",
    "botocore.awsrequest",
    "botocore.history",
)
_NAMESPACES = ("botocore", "aiobotocore", "boto3", "aioboto3")

# A quoted field name containing "Plaintext", then its value: a quoted string (JSON, or
# a Python str/bytes repr, escapes included), or failing that everything up to the next
# delimiter. The quote may itself be backslash-escaped (JSON inside a repr).
_FIELD = re.compile(
    r"""(?P<q>\\?["'])(?P<name>\w*Plaintext\w*)(?P=q)(?P<sep>\s*[:=]\s*)"""
    r"""(?P<value>b?'(?:[^'\\]|\\.)*'|b?"(?:[^"\\]|\\.)*"|\\"(?:[^\\]|\\[^"])*\\"|[^,}\s]+)""",
    re.DOTALL,
)


def _replace(match: re.Match[str]) -> str:
    return f'{match["q"]}{match["name"]}{match["q"]}{match["sep"]}"{REDACTED}"'


def redact(text: str) -> str:
    """``text`` with the value of every ``*Plaintext*`` field replaced, or a notice in its
    place when some occurrence of the name is not a field this can take apart."""
    if _SENSITIVE not in text:
        return text
    redacted, count = _FIELD.subn(_replace, text)
    if redacted.count(_SENSITIVE) != count:  # each replacement keeps the name once
        return WITHHELD
    return redacted


class KeyMaterialFilter(logging.Filter):
    """Rewrites records that carry KMS ``Plaintext`` fields; never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: logging reports it; we must not raise
            message = f"{record.msg!s} {record.args!r}"
            if _SENSITIVE in message:
                record.msg, record.args = WITHHELD, ()
            return True
        redacted = redact(message)
        if redacted is not message:
            record.msg, record.args = redacted, ()
        return True


_FILTER = KeyMaterialFilter()
_lock = threading.Lock()
_holders = 0
_installed_on: list[logging.Logger] = []


def _loggers() -> list[logging.Logger]:
    names = set(_KNOWN_LOGGERS)
    for name, entry in list(logging.Logger.manager.loggerDict.items()):
        if isinstance(entry, logging.Logger) and name.split(".", 1)[0] in _NAMESPACES:
            names.add(name)
    return [logging.getLogger(name) for name in sorted(names)]


def retain_redaction() -> None:
    """One more holder (a KMS keyring opening): the first installs the filter."""
    global _holders
    with _lock:
        if _holders == 0:
            _installed_on[:] = _loggers()
            for logger in _installed_on:
                logger.addFilter(_FILTER)
        _holders += 1


def release_redaction() -> None:
    """One holder fewer (a KMS keyring closing): the last removes the filter."""
    global _holders
    with _lock:
        if _holders == 0:
            return
        _holders -= 1
        if _holders == 0:
            for logger in _installed_on:
                logger.removeFilter(_FILTER)
            _installed_on.clear()


def redaction_active() -> bool:
    """Whether the filter is installed (some KMS keyring is open)."""
    with _lock:
        return _holders > 0
