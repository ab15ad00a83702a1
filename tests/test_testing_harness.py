"""``aioenvelope.testing``: the offline harness users run their own tests with, and its
pytest plugin, exercised as a user would (the plugin through a separate pytest process
that finds it by its entry point, as it would in their project)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import boto3
import pytest

from aioenvelope import (
    BranchKeyStore,
    EnvelopeClient,
    HierarchicalKeyring,
    KmsKeyring,
    errors,
)
from aioenvelope.testing import EmbeddedAws, embedded_aws


def refuses_connections(endpoint_url: str) -> bool:
    parts = urlsplit(endpoint_url)
    with socket.socket() as sock:
        return sock.connect_ex((parts.hostname or "", parts.port or 0)) != 0


async def round_trip(aws: EmbeddedAws, key_arn: str) -> bytes:
    keyring = KmsKeyring(key_arn, session=aws.session(), endpoint_url=aws.endpoint_url)
    async with EnvelopeClient(keyring) as client:
        return await client.decrypt(await client.encrypt(b"offline", encryption_context={"t": "1"}))


async def test_async_with_gives_kms_dynamodb_and_s3_on_one_endpoint() -> None:
    """What a user's test needs for each keyring and integration: a KMS key (by ARN,
    and its alias), a DynamoDB key store for the hierarchical keyring, an S3 bucket."""
    async with embedded_aws() as aws:
        key_arn = await aws.create_kms_key(alias="harness-orders")
        assert key_arn.startswith(f"arn:aws:kms:{aws.region}:")
        assert await round_trip(aws, key_arn) == b"offline"
        kms = boto3.client("kms", **aws.client_kwargs())
        aliases = {a["AliasName"]: a.get("TargetKeyId") for a in kms.list_aliases()["Aliases"]}
        assert aliases["alias/harness-orders"] == key_arn.rsplit("/", 1)[1]

        store = BranchKeyStore(
            "harness-branch-keys",
            logical_key_store_name="tests",
            kms_key_id=key_arn,
            session=aws.session(),
            endpoint_url=aws.endpoint_url,
        )
        async with store:
            await store.create_table()
            await store.create_branch_key("tenant")
        async with EnvelopeClient(HierarchicalKeyring(store, branch_key_id="tenant")) as client:
            blob = await client.encrypt(b"record", encryption_context={"row": "7"})
            assert await client.decrypt(blob) == b"record"

        async with aws.session().client("s3", endpoint_url=aws.endpoint_url) as s3:
            await s3.create_bucket(
                Bucket="user-tests", CreateBucketConfiguration={"LocationConstraint": aws.region}
            )
            await s3.put_object(Bucket="user-tests", Key="k", Body=blob)
            got = await (await s3.get_object(Bucket="user-tests", Key="k"))["Body"].read()
        assert got == blob
        endpoint = aws.endpoint_url
    assert refuses_connections(endpoint)


def test_plain_with_works_outside_any_event_loop() -> None:
    """A synchronous test (or a script) starts it with ``with`` and runs its async code
    with anyio.run / asyncio.run inside."""
    with embedded_aws(region="eu-west-1") as aws:

        async def scenario() -> bytes:
            return await round_trip(aws, await aws.create_kms_key())

        assert aws.region == "eu-west-1"
        assert anyio.run(scenario) == b"offline"
        endpoint = aws.endpoint_url
    assert refuses_connections(endpoint)


async def test_a_stopped_harness_says_how_to_start_it() -> None:
    aws = embedded_aws()
    with pytest.raises(errors.ConfigurationError, match="async with embedded_aws"):
        aws.endpoint_url  # noqa: B018 - the property raises
    assert "not running" in repr(aws)
    async with aws:
        with pytest.raises(errors.ConfigurationError, match="already running"):
            aws.start()
    with pytest.raises(errors.ConfigurationError):
        aws.endpoint_url  # noqa: B018


async def test_its_session_never_carries_the_callers_real_credentials(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAREALKEYREALKEY00")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "real-secret")
    async with embedded_aws() as aws:
        credentials = await aws.session().get_credentials()
        assert credentials.access_key == "aioenvelope-testing"
        assert "real-secret" not in repr(aws.client_kwargs())


USER_TESTS = """
import os

from aioenvelope import EnvelopeClient, KmsKeyring


async def test_round_trip_with_the_plugins_fixtures(embedded_aws, kms_key_arn):
    keyring = KmsKeyring(
        kms_key_arn, session=embedded_aws.session(), endpoint_url=embedded_aws.endpoint_url
    )
    async with EnvelopeClient(keyring) as client:
        assert await client.decrypt(await client.encrypt(b"x")) == b"x"


def test_each_test_gets_its_own_key(kms_key_arn):
    KEYS.append(kms_key_arn)


def test_another_key(kms_key_arn):
    KEYS.append(kms_key_arn)
    assert len(set(KEYS)) == 2


def test_the_environment_cannot_reach_real_aws(embedded_aws):
    assert os.environ["AWS_ACCESS_KEY_ID"] == "aioenvelope-testing"
    assert os.environ["AWS_DEFAULT_REGION"] == embedded_aws.region
    assert "AWS_PROFILE" not in os.environ
    assert "AWS_SESSION_TOKEN" not in os.environ


KEYS = []
"""


def test_the_pytest_plugin_is_found_by_its_entry_point_in_a_users_project(
    tmp_path: Path,
) -> None:
    """A user's project with no conftest: the fixtures come from the installed package's
    ``pytest11`` entry point. Their real profile and session token are hidden from the
    tests while the server runs."""
    (tmp_path / "test_user.py").write_text(textwrap.dedent(USER_TESTS))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PYTEST_"))}
    env.update({"AWS_PROFILE": "production", "AWS_SESSION_TOKEN": "real-token"})
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            "asyncio_mode=auto",
            str(tmp_path / "test_user.py"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 passed" in done.stdout
