"""Every ```python block of README.md and docs/*.md, run for real (issue 14).

The blocks are extracted from the Markdown (file and line) and executed against an
embedded AWS: one moto server for this module (:func:`aioenvelope.testing.embedded_aws`),
reached through ``AWS_ENDPOINT_URL``, so a block needs no endpoint of its own and
``KmsKeyring("alias/my-app-data")`` reaches moto unmodified. Before each scenario the
aliases the docs name (:data:`DOC_ALIASES`) are pointed at new keys and the tables they
create dropped (moto's own reset would wipe every other test's keys: its state is per
process).

The only change made to a block's text is its key setup (:meth:`DocAws.swap_key_setup`):
a placeholder key ARN (``arn:aws:kms:eu-west-1:111122223333:key/...``) becomes the ARN
of a key created in moto in that ARN's region, and the placeholder account
``111122223333`` becomes moto's. Nothing else in a block is touched.

:data:`BLOCKS` maps each block (its file and a line found in that block only) to the
scenario test that runs it; :func:`test_every_doc_block_is_run_by_a_scenario` fails on a
block that no entry matches, and on an entry that matches no block. A scenario calls
what its block defines with real inputs and asserts the results; names a fragment takes
from the prose around it (``keyring``, ``record``, ``app``, ``storage``, ...) come from
the scenario's prelude, given to the block as its globals.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import inspect
import re
import socket
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import CodeType
from typing import Annotated, Any

import aiofiles  # type: ignore[import-untyped]  # aioboto3's dependency, no stubs
import anyio
import boto3
import httpx
import pytest
from aiohttp import test_utils, web
from azure_kv_fake import AzureKeyVaultFake
from fastapi import Depends, FastAPI
from gcp_kms_fake import GcpKmsFake
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from vault_server import VaultServer

import aioenvelope
from aioenvelope import (
    BranchKeyStore,
    EnvelopeClient,
    HierarchicalKeyring,
    KmsKeyring,
    RawAesKeyring,
    errors,
)
from aioenvelope.integrations.starlette import (
    envelope_lifespan,
    get_envelope_client,
    install_error_handlers,
)
from aioenvelope.testing import DUMMY_CREDENTIALS, REAL_AWS_ENVIRONMENT, EmbeddedAws, embedded_aws

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = ("README.md", *(f"docs/{path.name}" for path in sorted(ROOT.glob("docs/*.md"))))

# (file, a line that only this block of the file contains) -> the test that runs it.
BLOCKS: dict[tuple[str, str], str] = {
    (
        "docs/observability.md",
        "telemetry=Telemetry(",
    ): "test_observability_guide_exports_spans_and_metrics_to_the_console",
    ("README.md", "asyncio.run(main())"): "test_readme_quickstart_refuses_another_tenant",
    (
        "README.md",
        "async def store_upload(client, request, out):",
    ): "test_readme_streaming_handlers_round_trip_through_real_servers",
    ("README.md", '@app.post("/seal")'): "test_readme_fastapi_service_seals_a_request_body",
    (
        "README.md",
        "async def rotate(client, blobs, new_keyring):",
    ): "test_readme_rotate_moves_messages_to_the_new_key_only",
    ("README.md", "client = EnvelopeClient("): "test_key_manager_settings_build_a_working_client",
    ("README.md", "store = BranchKeyStore("): "test_readme_hierarchical_keyring_encrypts_a_record",
    ("README.md", "async def test_records_round_trip()"): "test_readme_testing_example_passes",
    (
        "docs/caching-and-limits.md",
        "client = EnvelopeClient(",
    ): "test_key_manager_settings_build_a_working_client",
    (
        "docs/errors.md",
        "async def open_submitted(",
    ): "test_errors_open_submitted_maps_the_callers_faults_to_4xx",
    (
        "docs/errors.md",
        "def install_key_service_handler(",
    ): "test_errors_key_service_handler_answers_503_only_when_transient",
    (
        "docs/hierarchical-keyring.md",
        "tenant = await store.create_branch_key()",
    ): "test_hierarchical_keyring_guide_sets_up_and_round_trips",
    (
        "docs/hierarchical-keyring.md",
        "async def branch_key_for(context):",
    ): "test_hierarchical_keyring_guide_sets_up_and_round_trips",
    (
        "docs/operating-kms.md",
        "keyring = KmsDiscoveryKeyring(",
    ): "test_operating_kms_discovery_keyring_reads_only_its_filter",
    ("docs/rotation.md", "def under_old_key("): "test_rotation_under_old_key_finds_the_old_key",
    ("docs/rotation.md", "async def rotate(rows, store):"): "test_rotation_rotate_rows_re_encrypts",
    ("docs/streaming.md", "async def seal("): "test_streaming_seal_writes_a_message_to_a_file",
    ("docs/vault.md", "auth=AppRoleAuth(role_id, secret_id),"): "test_vault_guide_round_trips",
    (
        "docs/gcp-kms.md",
        'keyring = GcpKmsKeyring("projects/acme/locations/europe-west1/keyRings/app/cryptoKeys/orders")',
    ): "test_gcp_guide_round_trips_on_the_fake",
    (
        "docs/azure-key-vault.md",
        'keyring = AzureKeyVaultKeyring("https://orders-kv.vault.azure.net/keys/orders")',
    ): "test_azure_guide_round_trips_on_the_fake",
    (
        "docs/streaming.md",
        '@app.get("/files/{name}")',
    ): "test_streaming_download_route_serves_plaintext",
}

DOC_ALIASES = ("alias/my-app-data", "alias/data")
DOC_TABLES = ("branch-keys",)  # the key store table the docs' blocks create
PLACEHOLDER_ACCOUNT = "111122223333"
PLACEHOLDER_ARN = re.compile(
    rf"arn:aws:kms:(?P<region>[a-z0-9-]+):{PLACEHOLDER_ACCOUNT}:key/[\w.-]+"
)
# Variables that would point a block's clients somewhere other than the embedded server.
FOREIGN_AWS_ENVIRONMENT = (
    *REAL_AWS_ENVIRONMENT,
    "AWS_ENDPOINT_URL_KMS",
    "AWS_ENDPOINT_URL_DYNAMODB",
    "AWS_ENDPOINT_URL_S3",
)
CONTEXT = {"tenant": "t1"}


@dataclass(frozen=True)
class DocBlock:
    file: str
    line: int  # the block's first line of code, in the Markdown file
    source: str


def extract_blocks(file: str) -> list[DocBlock]:
    """The ```python blocks of one Markdown file, in order."""
    blocks: list[DocBlock] = []
    start: int | None = None
    body: list[str] = []
    for number, line in enumerate((ROOT / file).read_text().splitlines(), start=1):
        if start is None:
            if line.strip() == "```python":
                start, body = number + 1, []
        elif line.strip() == "```":
            blocks.append(DocBlock(file, start, textwrap.dedent("\n".join(body)) + "\n"))
            start = None
        else:
            body.append(line)
    assert start is None, f"{file}:{start}: a ```python block is never closed"
    return blocks


def all_blocks() -> list[DocBlock]:
    return [block for file in DOC_FILES for block in extract_blocks(file)]


def doc_block(file: str, marker: str) -> DocBlock:
    """The one block of ``file`` containing ``marker``, which must be a key of BLOCKS."""
    assert (file, marker) in BLOCKS, f"({file!r}, {marker!r}) is not an entry of BLOCKS"
    found = [block for block in extract_blocks(file) if marker in block.source]
    assert len(found) == 1, f"{len(found)} blocks of {file} contain {marker!r}, not one"
    return found[0]


class DocAws:
    """The embedded AWS the blocks run against, and their key setup."""

    def __init__(self, aws: EmbeddedAws) -> None:
        self.aws = aws
        self.account = ""
        self.placeholders: dict[str, str] = {}  # placeholder ARN -> the real key's ARN
        # Another key service's placeholder key ID -> the key a scenario made on its fake.
        self.other_keys: dict[str, str] = {}
        self._kms_clients: dict[str, Any] = {}
        # The scenarios' own keyrings share one session (each new one loads botocore's
        # models again); the blocks' keyrings make theirs, as the docs show.
        self.session = aws.session()

    def kms(self, region: str | None = None) -> Any:
        """A boto3 KMS client for ``region`` (default: the server's) on the server."""
        region = region or self.aws.region
        if region not in self._kms_clients:
            kwargs = {**self.aws.client_kwargs(), "region_name": region}
            self._kms_clients[region] = boto3.client("kms", **kwargs)
        return self._kms_clients[region]

    def keyring(self, key_id: str) -> KmsKeyring:
        """A KMS keyring for the scenario's own writing and checking."""
        return KmsKeyring(key_id, session=self.session)

    def create_key(self, region: str | None = None, alias: str | None = None) -> str:
        kms = self.kms(region)
        meta = kms.create_key(Description="docs scenario")["KeyMetadata"]
        if alias is not None:
            kms.create_alias(AliasName=alias, TargetKeyId=meta["KeyId"])
        return str(meta["Arn"])

    def reset(self) -> None:
        """A fresh start for a scenario: the aliases the docs name point at new keys,
        placeholders get new keys, and the tables the docs create are gone.

        Not moto's ``/moto-api/reset``: moto keeps its state per process, not per server,
        so a reset would wipe the keys and tables of every other test in the session."""
        self.placeholders.clear()
        self.other_keys.clear()
        kms = self.kms()
        existing = {a["AliasName"] for a in kms.list_aliases(Limit=1000)["Aliases"]}
        for alias in DOC_ALIASES:
            key_arn = self.create_key()
            self.account = key_arn.split(":")[4]
            if alias in existing:
                kms.update_alias(AliasName=alias, TargetKeyId=key_arn)
            else:
                kms.create_alias(AliasName=alias, TargetKeyId=key_arn)
        dynamodb = boto3.client("dynamodb", **self.aws.client_kwargs())
        for table in DOC_TABLES:
            with contextlib.suppress(dynamodb.exceptions.ResourceNotFoundException):
                dynamodb.delete_table(TableName=table)

    def swap_key_setup(self, source: str) -> str:
        """``source`` with placeholder key ARNs replaced by real ones (a key created in
        the ARN's region, the same key for the same placeholder) and the placeholder
        account by moto's: the only change made to a block."""

        def real_arn(match: re.Match[str]) -> str:
            placeholder = match.group(0)
            if placeholder not in self.placeholders:
                self.placeholders[placeholder] = self.create_key(match["region"])
            return self.placeholders[placeholder]

        swapped = PLACEHOLDER_ARN.sub(real_arn, source).replace(PLACEHOLDER_ACCOUNT, self.account)
        for placeholder, real in self.other_keys.items():  # other key services' key IDs
            swapped = swapped.replace(placeholder, real)
        return swapped

    def compile(self, block: DocBlock) -> CodeType:
        # Padded so that tracebacks name the Markdown file's own lines. dont_inherit:
        # this module's `from __future__ import annotations` must not leak into a block.
        padded = "\n" * (block.line - 1) + self.swap_key_setup(block.source)
        code: CodeType = compile(
            padded,
            str(ROOT / block.file),
            "exec",
            flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT,
            dont_inherit=True,
        )
        return code

    async def run(self, file: str, marker: str, **prelude: Any) -> dict[str, Any]:
        """Run a block (top-level ``await`` allowed) with ``prelude`` as its globals; the
        globals afterwards, for the scenario to call what the block defined."""
        namespace = {"__name__": "__docs__", **prelude}
        result = eval(self.compile(doc_block(file, marker)), namespace)
        if result is not None:  # a block with top-level await: a coroutine
            await result
        return namespace

    def run_sync(self, file: str, marker: str, **prelude: Any) -> dict[str, Any]:
        """Run a block that must not find a running event loop (it calls asyncio.run)."""
        code = self.compile(doc_block(file, marker))
        assert not code.co_flags & inspect.CO_COROUTINE, f"{file}: {marker!r} awaits"
        namespace = {"__name__": "__docs__", **prelude}
        exec(code, namespace)
        return namespace


@pytest.fixture(scope="module")
def docs_aws_server() -> Iterator[DocAws]:
    """One moto server for the module, and the environment botocore reads pointed at it
    (dummy credentials, its region, AWS_ENDPOINT_URL), restored afterwards."""
    with pytest.MonkeyPatch.context() as env, embedded_aws() as aws:
        for name in FOREIGN_AWS_ENVIRONMENT:
            env.delenv(name, raising=False)
        env.setenv("AWS_ENDPOINT_URL", aws.endpoint_url)
        env.setenv("AWS_ACCESS_KEY_ID", DUMMY_CREDENTIALS["aws_access_key_id"])
        env.setenv("AWS_SECRET_ACCESS_KEY", DUMMY_CREDENTIALS["aws_secret_access_key"])
        env.setenv("AWS_DEFAULT_REGION", aws.region)
        env.setenv("AWS_REGION", aws.region)
        yield DocAws(aws)


@pytest.fixture
def docs_aws(docs_aws_server: DocAws) -> DocAws:
    """The server as each scenario starts: empty but for the aliases the docs name."""
    docs_aws_server.reset()
    return docs_aws_server


async def chunks_of(data: bytes, size: int = 40_000) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def unused_loopback_url() -> str:
    """A loopback URL nothing listens on: every call to it fails at once (network)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# -- coverage ------------------------------------------------------------------------------


def coverage_problems(blocks: list[DocBlock]) -> list[str]:
    """What keeps ``blocks`` and BLOCKS from matching one to one, each saying what to do."""
    problems = []
    for block in blocks:
        entries = [key for key in BLOCKS if key[0] == block.file and key[1] in block.source]
        if len(entries) != 1:
            first_line = block.source.strip().splitlines()[0]
            problems.append(
                f"{block.file}:{block.line} (starting {first_line!r}) is matched by "
                f"{len(entries)} entries of BLOCKS {entries}: write a scenario test in "
                "tests/test_docs_code.py that runs it with DocAws.run (names it takes "
                "from the prose in a prelude; call what it defines and assert the "
                "results) and add (file, a line only this block contains) -> test name "
                "to BLOCKS"
            )
    for (file, marker), test_name in BLOCKS.items():
        found = [b for b in blocks if b.file == file and marker in b.source]
        if len(found) != 1:
            problems.append(
                f"BLOCKS entry ({file!r}, {marker!r}) finds {len(found)} blocks: "
                "update its marker to a line only that block contains, or remove it"
            )
        if not callable(globals().get(test_name)) or not test_name.startswith("test_"):
            problems.append(f"BLOCKS names {test_name!r}, which is not a test of this module")
    return problems


def test_every_doc_block_is_run_by_a_scenario() -> None:
    """A block added to the README or docs without a scenario (or changed so that its
    entry no longer finds it) would be untested documentation again: fail, and say how
    to cover it. An entry that finds no block is stale and fails too."""
    problems = coverage_problems(all_blocks())
    assert not problems, "\n".join(problems)


def test_a_block_without_a_scenario_is_reported_with_what_to_do() -> None:
    """The check above is not vacuous: a new block, and the entry of a block whose
    marker line was edited away, are both reported."""
    blocks = all_blocks()
    new = DocBlock("docs/streaming.md", 999, "import aioenvelope\n\nprint(aioenvelope)\n")
    edited = [b for b in blocks if "def under_old_key(" not in b.source]
    (unmatched,) = coverage_problems([*blocks, new])
    assert unmatched.startswith("docs/streaming.md:999 (starting 'import aioenvelope')")
    assert "write a scenario test" in unmatched
    (stale,) = coverage_problems(edited)
    assert stale.startswith("BLOCKS entry ('docs/rotation.md', 'def under_old_key(') finds 0")


def test_key_setup_swap_changes_only_placeholder_keys_and_account(docs_aws: DocAws) -> None:
    """The swap is the only liberty taken with a block: ARNs become real keys of the
    placeholder's region (one key per placeholder) and the account becomes moto's;
    every other character stays."""
    source = (
        'A = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-..."\n'
        'B = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-..."\n'
        'C = ["111122223333"]  # alias/my-app-data\n'
    )
    swapped = docs_aws.swap_key_setup(source).splitlines()
    (arn,) = docs_aws.placeholders.values()
    assert arn.startswith(f"arn:aws:kms:eu-west-1:{docs_aws.account}:key/")
    assert swapped == [
        f'A = "{arn}"',
        f'B = "{arn}"',
        f'C = ["{docs_aws.account}"]  # alias/my-app-data',
    ]


# -- README.md -------------------------------------------------------------------------------


def test_readme_quickstart_refuses_another_tenant(
    docs_aws: DocAws, capsys: pytest.CaptureFixture[str]
) -> None:
    """The quickstart runs as a script (asyncio.run, so no loop may be running): its
    round trip asserts, and the other tenant's decrypt is refused and printed."""
    docs_aws.run_sync("README.md", "asyncio.run(main())")
    assert capsys.readouterr().out.startswith("refused: ")


async def test_readme_streaming_handlers_round_trip_through_real_servers(
    docs_aws: DocAws, tmp_path: Path
) -> None:
    """store_upload gets a real Starlette request (over httpx's ASGI transport) and an
    aiofiles file; serve_download a real aiohttp request's reader and response on a
    loopback server: what one seals, the other opens."""
    ns = await docs_aws.run("README.md", "async def store_upload(client, request, out):")
    plaintext = bytes(range(256)) * 1000
    sealed = tmp_path / "upload.sealed"

    async with EnvelopeClient(docs_aws.keyring("alias/my-app-data")) as client:

        async def upload(request: Request) -> Response:
            async with aiofiles.open(sealed, "wb") as out:
                await ns["store_upload"](client, request, out)
            return Response(status_code=204)

        starlette_app = Starlette(routes=[Route("/upload", upload, methods=["POST"])])
        async with serving(starlette_app) as http:
            answer = await http.post("/upload", content=chunks_of(plaintext))
        assert answer.status_code == 204
        ciphertext = await anyio.Path(sealed).read_bytes()
        assert await client.decrypt(ciphertext, encryption_context=CONTEXT) == plaintext

        async def download(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse()
            await response.prepare(request)
            await ns["serve_download"](client, request.content, response)
            await response.write_eof()
            return response

        aiohttp_app = web.Application()
        aiohttp_app.router.add_post("/open", download)
        async with test_utils.TestClient(test_utils.TestServer(aiohttp_app)) as http_client:
            opened = await http_client.post("/open", data=ciphertext)
            assert opened.status == 200
            assert await opened.read() == plaintext


@asynccontextmanager
async def serving(
    app: Starlette, *, raise_app_exceptions: bool = True
) -> AsyncIterator[httpx.AsyncClient]:
    """``app`` started (its lifespan entered, as a server would) and an HTTP client for
    it over httpx's ASGI transport (which re-raises an unhandled error unless told not
    to, instead of answering the 500 a server would)."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://docs") as http,
    ):
        yield http


async def test_readme_fastapi_service_seals_a_request_body(docs_aws: DocAws) -> None:
    """The FastAPI app, lifespan included: /seal answers a message under alias/data with
    the documented context, which decrypts to the request body."""
    ns = await docs_aws.run("README.md", '@app.post("/seal")')
    async with serving(ns["app"]) as http:
        answer = await http.post("/seal", content=b"sealed by the README")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/octet-stream"
    async with EnvelopeClient(docs_aws.keyring("alias/data")) as client:
        opened = await client.decrypt(answer.content, encryption_context={"purpose": "seal"})
    assert opened == b"sealed by the README"


async def test_readme_rotate_moves_messages_to_the_new_key_only(docs_aws: DocAws) -> None:
    """rotate() returns the re-encrypted messages, which open under the new key and no
    longer under the old one, and the failures (a blob that is no message) apart."""
    ns = await docs_aws.run("README.md", "async def rotate(client, blobs, new_keyring):")
    new_key = docs_aws.create_key()
    records = [f"row {i}".encode() for i in range(3)]
    async with EnvelopeClient(docs_aws.keyring("alias/my-app-data")) as client:
        blobs = [await client.encrypt(r, encryption_context=CONTEXT) for r in records]
        new_keyring = docs_aws.keyring(new_key)
        rotated, failed = await ns["rotate"](client, [*blobs, b"junk"], new_keyring)
    assert [(f.item, type(f.error)) for f in failed] == [(b"junk", errors.MalformedMessageError)]
    async with EnvelopeClient(docs_aws.keyring(new_key)) as new_client:
        assert [await new_client.decrypt(b, encryption_context=CONTEXT) for b in rotated] == records
    async with EnvelopeClient(docs_aws.keyring("alias/my-app-data")) as old_client:
        for blob in rotated:
            with pytest.raises(errors.NoUsableKeyError):
                await old_client.decrypt(blob)


@pytest.mark.parametrize("file", ["README.md", "docs/caching-and-limits.md"])
async def test_key_manager_settings_build_a_working_client(docs_aws: DocAws, file: str) -> None:
    """The key manager settings (prelude: ``keyring``, a KMS keyring) make a client that
    round trips and reuses its data key: three messages, one GenerateDataKey."""
    keyring = docs_aws.keyring("alias/my-app-data")
    ns = await docs_aws.run(file, "client = EnvelopeClient(", keyring=keyring)
    async with ns["client"] as client:
        blobs = [await client.encrypt(b"x", encryption_context=CONTEXT) for _ in range(3)]
        assert [await client.decrypt(b, encryption_context=CONTEXT) for b in blobs] == [b"x"] * 3
        assert client.stats.kms_calls["GenerateDataKey"] == 1


async def test_readme_hierarchical_keyring_encrypts_a_record(docs_aws: DocAws) -> None:
    """Prelude: ``record``. The block creates the table and tenant-acme's branch key and
    encrypts; a keyring on a new store object (another process) decrypts the record."""
    record = b"order 42: 3 widgets"
    ns = await docs_aws.run("README.md", "store = BranchKeyStore(", record=record)
    (kms_key_arn,) = docs_aws.placeholders.values()
    store = BranchKeyStore(
        "branch-keys",
        logical_key_store_name="orders",
        kms_key_id=kms_key_arn,
        session=docs_aws.session,
    )
    async with EnvelopeClient(HierarchicalKeyring(store, branch_key_id="tenant-acme")) as client:
        context = {"tenant": "acme", "row": "42"}
        assert await client.decrypt(ns["blob"], encryption_context=context) == record


async def test_readme_testing_example_passes(docs_aws: DocAws) -> None:
    """The example test (its own embedded AWS, an alias, a round trip) passes as given:
    its asserts are the assertions."""
    ns = await docs_aws.run("README.md", "async def test_records_round_trip()")
    assert inspect.iscoroutinefunction(ns["test_records_round_trip"])
    assert await ns["test_records_round_trip"]() is None


# -- docs/vault.md ------------------------------------------------------------------------------


async def test_vault_guide_round_trips(
    docs_aws: DocAws, vault_server: VaultServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guide's keyring on the real OpenBao dev server: VAULT_ADDR names it, the
    prelude's AppRole has the guide's narrow policy on key "orders", and the record it
    seals opens again under a fresh client (the key setup is the only thing supplied)."""
    with contextlib.suppress(AssertionError):  # already made by an earlier run
        vault_server.create_key("orders")
    vault_server.put_policy(
        "docs-orders",
        "\n".join(
            f'path "transit/{path}" {{ capabilities = ["{capability}"] }}'
            for path, capability in (
                ("datakey/plaintext/orders", "update"),
                ("decrypt/orders", "update"),
                ("keys/orders", "read"),
            )
        ),
    )
    role_id, secret_id = vault_server.approle(["docs-orders"])
    monkeypatch.setenv("VAULT_ADDR", vault_server.url)
    monkeypatch.delenv("VAULT_TOKEN", raising=False)
    record = b'{"order": 7}'
    ns = await docs_aws.run(
        "docs/vault.md",
        "auth=AppRoleAuth(role_id, secret_id),",
        role_id=role_id,
        secret_id=secret_id,
        record=record,
    )
    reader = aioenvelope.VaultTransitKeyring(
        "orders", auth=aioenvelope.AppRoleAuth(role_id, secret_id)
    )
    async with EnvelopeClient(reader) as client:
        assert await client.decrypt(ns["blob"], encryption_context={"tenant": "acme"}) == record


# -- docs/gcp-kms.md ------------------------------------------------------------------------------


async def test_gcp_guide_round_trips_on_the_fake(
    docs_aws: DocAws, gcp_kms: GcpKmsFake, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guide's keyring against the Cloud KMS fake. Swapped, as key setup: the key
    name (a key made on the fake), google.auth.default (anonymous credentials: the fake
    checks none), and a transport to the fake. The block round trips as written."""
    import google.auth
    from google.auth.credentials import AnonymousCredentials

    name = "projects/acme/locations/europe-west1/keyRings/app/cryptoKeys/orders"
    docs_aws.other_keys[name] = gcp_kms.create_key(f"docs-{uuid.uuid4().hex[:8]}")
    monkeypatch.setattr(
        google.auth,
        "default",
        lambda **_: (AnonymousCredentials(), "docs-project"),  # type: ignore[no-untyped-call]
    )
    with_fake_transport = functools.partial(
        aioenvelope.GcpKmsKeyring, client_options=gcp_kms.client_options()
    )
    monkeypatch.setattr(aioenvelope, "GcpKmsKeyring", with_fake_transport)
    record = b'{"order": 7}'
    ns = await docs_aws.run(
        "docs/gcp-kms.md",
        'keyring = GcpKmsKeyring("projects/acme/locations/europe-west1/keyRings/app/cryptoKeys/orders")',
        record=record,
    )
    (edk,) = aioenvelope.inspect(ns["blob"]).encrypted_data_keys
    assert (edk.provider_id, edk.provider_info) == ("gcp-kms", docs_aws.other_keys[name].encode())


# -- docs/azure-key-vault.md ---------------------------------------------------------------------


async def test_azure_guide_round_trips_on_the_fake(
    docs_aws: DocAws, azure_kv: AzureKeyVaultFake, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guide's keyring against the Key Vault fake. Swapped, as key setup: the key URL
    (a key made on the fake), DefaultAzureCredential (the fake's token), and the fake's
    client_options (trust its throwaway CA; its challenge names vault.azure.net, not its
    host). Nothing else of the block changes: it round trips as written."""
    import azure.identity.aio

    key_url = azure_kv.create_key()
    docs_aws.other_keys["https://orders-kv.vault.azure.net/keys/orders"] = key_url
    monkeypatch.setattr(azure.identity.aio, "DefaultAzureCredential", azure_kv.credential)
    with_fake_options = functools.partial(
        aioenvelope.AzureKeyVaultKeyring, client_options=azure_kv.client_options()
    )
    monkeypatch.setattr(aioenvelope, "AzureKeyVaultKeyring", with_fake_options)
    ns = await docs_aws.run(
        "docs/azure-key-vault.md",
        'keyring = AzureKeyVaultKeyring("https://orders-kv.vault.azure.net/keys/orders")',
        data=b"order 7",
    )
    assert azure_kv.requests(key_url.rsplit("/", 1)[1])["wrapkey"] == 1
    assert ns["message"].startswith(b"\x02")


# -- docs/errors.md ----------------------------------------------------------------------------


async def test_errors_open_submitted_maps_the_callers_faults_to_4xx(docs_aws: DocAws) -> None:
    """open_submitted returns the plaintext of a good blob; a blob that is no message or
    was tampered with is a 400, one for another tenant or another key a 403."""
    ns = await docs_aws.run("docs/errors.md", "async def open_submitted(")
    open_submitted, http_exception = ns["open_submitted"], ns["HTTPException"]
    async with EnvelopeClient(RawAesKeyring("other", "key", bytes(32))) as other_client:
        foreign = await other_client.encrypt(b"payload", encryption_context=CONTEXT)
    async with EnvelopeClient(docs_aws.keyring("alias/my-app-data")) as client:
        blob = await client.encrypt(b"payload", encryption_context=CONTEXT)
        assert await open_submitted(client, blob, "t1") == b"payload"
        tampered = blob[:-1] + bytes([blob[-1] ^ 1])
        for bad, tenant, status in [
            (b"not a message", "t1", 400),
            (tampered, "t1", 400),
            (blob, "t2", 403),
            (foreign, "t1", 403),
        ]:
            with pytest.raises(http_exception) as refused:
                await open_submitted(client, bad, tenant)
            assert refused.value.status_code == status


async def test_errors_key_service_handler_answers_503_only_when_transient(
    docs_aws: DocAws,
) -> None:
    """Installed on a Starlette app, the handler answers a real transient KMSError (KMS
    unreachable) with 503 and Retry-After, and a real answered one (no such key) with
    500."""
    ns = await docs_aws.run("docs/errors.md", "def install_key_service_handler(")
    key_arn = docs_aws.create_key()
    unreachable = KmsKeyring(
        key_arn,
        session=docs_aws.session,
        endpoint_url=unused_loopback_url(),
        check_keys=False,
        max_attempts=1,
    )
    missing = KmsKeyring("alias/no-such-key", session=docs_aws.session, check_keys=False)

    async def unavailable(request: Request) -> Response:
        async with EnvelopeClient(unreachable) as client:
            return Response(await client.encrypt(b"x"))

    async def refused(request: Request) -> Response:
        async with EnvelopeClient(missing) as client:
            return Response(await client.encrypt(b"x"))

    app = Starlette(routes=[Route("/unavailable", unavailable), Route("/refused", refused)])
    ns["install_key_service_handler"](app)
    async with serving(app) as http:
        outage = await http.get("/unavailable")
        answered = await http.get("/refused")
    assert (outage.status_code, outage.headers["retry-after"]) == (503, "1")
    assert outage.json() == {"error": "kms_unavailable"}
    assert (answered.status_code, answered.json()) == (500, {"error": "internal_error"})


# -- docs/hierarchical-keyring.md ---------------------------------------------------------------


async def test_hierarchical_keyring_guide_sets_up_and_round_trips(docs_aws: DocAws) -> None:
    """'Setting up' creates the table and two branch keys (one a random UUID); 'Using it'
    (prelude: that ``store``, and ``data``) round trips under tenant-acme's branch key."""
    data = b"row 42 of tenant acme"
    ns = await docs_aws.run(
        "docs/hierarchical-keyring.md", "tenant = await store.create_branch_key()"
    )
    assert uuid.UUID(ns["tenant"])
    ns = await docs_aws.run(
        "docs/hierarchical-keyring.md",
        "async def branch_key_for(context):",
        store=ns["store"],
        data=data,
    )
    assert ns["data"] == data
    (edk,) = aioenvelope.inspect(ns["blob"]).encrypted_data_keys
    assert (edk.provider_id, edk.provider_info) == ("aws-kms-hierarchy", b"tenant-acme")


# -- docs/operating-kms.md ---------------------------------------------------------------------


async def test_operating_kms_discovery_keyring_reads_only_its_filter(docs_aws: DocAws) -> None:
    """The discovery keyring (the account swapped for moto's) decrypts a message under a
    key of its account in eu-west-1, and skips one under a key in another region."""
    ns = await docs_aws.run("docs/operating-kms.md", "keyring = KmsDiscoveryKeyring(")
    sealed = {}
    for region in ("eu-west-1", "us-west-2"):
        async with EnvelopeClient(docs_aws.keyring(docs_aws.create_key(region))) as writer:
            sealed[region] = await writer.encrypt(region.encode())
    async with EnvelopeClient(ns["keyring"]) as reader:
        assert await reader.decrypt(sealed["eu-west-1"]) == b"eu-west-1"
        with pytest.raises(errors.NoUsableKeyError):
            await reader.decrypt(sealed["us-west-2"])


# -- docs/rotation.md -------------------------------------------------------------------------


async def test_rotation_under_old_key_finds_the_old_key(docs_aws: DocAws) -> None:
    """under_old_key is true for a message under OLD_KEY_ARN (also when written through an
    alias of it), false under another key, and raises on a cut-short header."""
    ns = await docs_aws.run("docs/rotation.md", "def under_old_key(")
    old_key, under_old_key = ns["OLD_KEY_ARN"], ns["under_old_key"]
    docs_aws.kms("eu-west-1").create_alias(AliasName="alias/old", TargetKeyId=old_key)
    other_key = docs_aws.create_key("eu-west-1")
    alias_arn = f"arn:aws:kms:eu-west-1:{docs_aws.account}:alias/old"
    sealed = {}
    for key in (old_key, alias_arn, other_key):
        async with EnvelopeClient(docs_aws.keyring(key)) as writer:
            sealed[key] = await writer.encrypt(b"x" * 10_000)
    assert [under_old_key(sealed[key][:4096]) for key in sealed] == [True, True, False]
    with pytest.raises(errors.TruncatedMessageError):
        under_old_key(sealed[old_key][:40])


@dataclass
class Row:
    id: int
    blob: bytes
    context: dict[str, str]


class Table:
    """The store rotate() writes to: replaces a row only if it still holds ``expected``."""

    def __init__(self, rows: list[Row]) -> None:
        self.blobs = {row.id: row.blob for row in rows}

    async def replace_if_unchanged(self, row_id: int, *, expected: bytes, new: bytes) -> None:
        if self.blobs[row_id] != expected:
            raise RuntimeError(f"row {row_id} changed meanwhile")
        self.blobs[row_id] = new


async def test_rotation_rotate_rows_re_encrypts(docs_aws: DocAws) -> None:
    """rotate(rows, store) writes every row back under NEW_KEY_ARN only, with its
    context; a row updated meanwhile is left alone and one that is no message fails,
    both reported."""
    ns = await docs_aws.run("docs/rotation.md", "async def rotate(rows, store):")
    old_key, new_key = ns["OLD_KEY_ARN"], ns["NEW_KEY_ARN"]
    contexts = [{"row": str(i)} for i in range(4)]
    async with EnvelopeClient(docs_aws.keyring(old_key)) as writer:
        rows = [
            Row(i, await writer.encrypt(f"row {i}".encode(), encryption_context=context), context)
            for i, context in enumerate(contexts)
        ]
    rows.append(Row(4, b"junk", {"row": "4"}))
    table = Table(rows)
    table.blobs[3] = b"written meanwhile"
    failures = await ns["rotate"](rows, table)
    assert [failure.item.id for failure in failures] == [3, 4]
    assert table.blobs[3] == b"written meanwhile"
    async with (
        EnvelopeClient(docs_aws.keyring(new_key)) as new_client,
        EnvelopeClient(docs_aws.keyring(old_key)) as old_client,
    ):
        for row in rows[:3]:
            rotated = table.blobs[row.id]
            opened = await new_client.decrypt(rotated, encryption_context=row.context)
            assert opened == f"row {row.id}".encode()
            with pytest.raises(errors.NoUsableKeyError):
                await old_client.decrypt(rotated, encryption_context=row.context)


# -- docs/streaming.md ------------------------------------------------------------------------


async def test_streaming_seal_writes_a_message_to_a_file(docs_aws: DocAws, tmp_path: Path) -> None:
    """seal() streams an async upload into an anyio file: one message, which decrypts to
    the upload under the documented context."""
    ns = await docs_aws.run("docs/streaming.md", "async def seal(")
    plaintext = bytes(range(256)) * 1000
    async with EnvelopeClient(docs_aws.keyring("alias/my-app-data")) as client:
        async with await anyio.open_file(tmp_path / "sealed", "wb") as out:
            await ns["seal"](client, chunks_of(plaintext), out)
        ciphertext = await anyio.Path(tmp_path / "sealed").read_bytes()
        assert await client.decrypt(ciphertext, encryption_context=CONTEXT) == plaintext


class MemoryStorage:
    """``storage`` of the streaming guide: open(name) is an async iterable of bytes."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects

    def open(self, name: str) -> AsyncIterator[bytes]:
        return chunks_of(self.objects[name])


async def test_streaming_download_route_serves_plaintext(docs_aws: DocAws) -> None:
    """Prelude, as the guide's sentence says: a FastAPI ``app`` with the envelope
    lifespan, ``Envelope`` the client dependency, ``storage`` in memory. The route
    streams a file's plaintext; a file whose context names another file is refused
    with an error status, before any plaintext."""
    plaintext = b"id,amount\n" + b"7,100\n" * 40_000
    async with EnvelopeClient(docs_aws.keyring("alias/my-app-data")) as writer:
        blob = await writer.encrypt(plaintext, encryption_context={"file": "report.csv"})
    app = FastAPI(
        lifespan=envelope_lifespan(lambda: EnvelopeClient(docs_aws.keyring("alias/my-app-data")))
    )
    install_error_handlers(app)
    prelude = {
        "app": app,
        "Envelope": Annotated[EnvelopeClient, Depends(get_envelope_client)],
        "storage": MemoryStorage({"report.csv": blob, "moved.csv": blob}),
    }
    await docs_aws.run("docs/streaming.md", '@app.get("/files/{name}")', **prelude)
    async with serving(app, raise_app_exceptions=False) as http:
        served = await http.get("/files/report.csv")
        refused = await http.get("/files/moved.csv")
    assert (served.status_code, served.content) == (200, plaintext)
    assert refused.status_code >= 400
    assert b"7,100" not in refused.content


# -- docs/observability.md ----------------------------------------------------------------------


@pytest.fixture
def console_exporters_on_current_stdout(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK's console exporters default ``out`` to the ``sys.stdout`` of the moment
    their module was first imported, which under pytest is whichever capture stream was
    active then (an earlier test's, or the session's), not ``capsys``'s. The page's code
    is run unchanged; only the default is rebound to the stdout of this test."""
    from opentelemetry.sdk.metrics import export as metric_export
    from opentelemetry.sdk.trace import export as trace_export

    span_exporter = trace_export.ConsoleSpanExporter
    metric_exporter = metric_export.ConsoleMetricExporter

    def spans_to_stdout(**kwargs: Any) -> Any:
        return span_exporter(**{"out": sys.stdout, **kwargs})

    def metrics_to_stdout(**kwargs: Any) -> Any:
        return metric_exporter(**{"out": sys.stdout, **kwargs})

    monkeypatch.setattr(trace_export, "ConsoleSpanExporter", spans_to_stdout)
    monkeypatch.setattr(metric_export, "ConsoleMetricExporter", metrics_to_stdout)


@pytest.mark.usefixtures("console_exporters_on_current_stdout")
async def test_observability_guide_exports_spans_and_metrics_to_the_console(
    docs_aws: DocAws, capsys: pytest.CaptureFixture[str]
) -> None:
    """The page's setup, as written: a KMS miss and a cache hit reach the console
    exporters as a KMS span and the cache-lookup metric; no context value is printed."""
    ns = await docs_aws.run("docs/observability.md", "telemetry=Telemetry(")
    async with ns["client"] as client:
        message = await client.encrypt(b"record", encryption_context={"tenant": "t-secret"})
        await client.encrypt(b"record", encryption_context={"tenant": "t-secret"})
        assert await client.decrypt(message) == b"record"
    ns["tracer_provider"].shutdown()  # flushes the batch processor
    ns["meter_provider"].shutdown()  # exports once more
    out = capsys.readouterr().out
    assert '"name": "aws-kms GenerateDataKey"' in out
    assert '"name": "aws-kms Decrypt"' in out
    assert "aioenvelope.cache.lookups" in out
    assert "aioenvelope.key_service.call.duration" in out
    assert "t-secret" not in out
