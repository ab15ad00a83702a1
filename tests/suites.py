"""The algorithm suites the tests run over, named once.

``COMMIT`` and ``COMMIT_SIGN`` are the two suites we write; ``COMMITTING_SUITES`` and
``LEGACY_SUITES`` are the same as pytest parameters with their suite IDs as test IDs
(the nine non-committing suites are those the ESDK still writes and we only read).
"""

from __future__ import annotations

import pytest

from aioenvelope import AlgorithmSuite

COMMIT = AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY
COMMIT_SIGN = AlgorithmSuite.AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384
SUITES = [COMMIT, COMMIT_SIGN]
COMMITTING_SUITES = [
    pytest.param(COMMIT, id="0x0478"),
    pytest.param(COMMIT_SIGN, id="0x0578"),
]
LEGACY_SUITES = [
    pytest.param(suite, id=f"0x{suite.suite_id:04x}")
    for suite in AlgorithmSuite
    if not suite.committing
]
KIB = 1024
MIB = 1024 * KIB
