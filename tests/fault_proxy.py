"""A fault-injecting HTTP reverse proxy in front of the moto KMS server.

moto answers every request promptly and correctly; it never throttles, fails with a 5xx
or hangs. :class:`FaultProxy` sits between the library and moto on 127.0.0.1 (port 0)
and does those things on demand, so retries and deadlines can be tested end to end
through real sockets and botocore's real retry logic.

The proxy is an aiohttp server on its own event loop in a background thread, so it
outlives pytest-asyncio's per-test loops and keeps serving while a test's loop is busy.
Every control (:meth:`throttle_next`, :meth:`fail_next`, :meth:`refuse_next`,
:meth:`slow_next`, :meth:`hang`) and every reading (:meth:`requests`, :meth:`received`,
:meth:`most_in_flight`) runs *in* the proxy's loop and returns once applied, so a fault
set before a call is in force for that call; all waits across threads are bounded.

Faults queue up in order and each one answers one request in place of moto (the next
request of its KMS operation, if it names one). While :meth:`hang` is on, requests are
read and counted but held unanswered until it is turned off (then they go on as usual)
or the proxy stops (then they get a 503). Every request is also recorded (operation,
retry header, JSON body), so a test can check what reached KMS, not only how often.

Services other than AWS's (Vault's transit engine) name their operation in the path, not
in ``X-Amz-Target``: give ``operation_of`` (method and path to an operation name), and
answer with their own error bodies with :meth:`FaultProxy.json_error_next`.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import json
import threading
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

__all__ = ["FaultProxy", "Received", "wait_for"]

T = TypeVar("T")

# Bounds on every wait across threads: starting, stopping, and each control call.
_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 10.0
_CONTROL_TIMEOUT = 5.0
_DYNAMODB = "com.amazonaws.dynamodb.v20120810#"
# Headers that describe one hop, not the message; aiohttp writes its own.
_HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "content-length",
        "expect",
        "date",
        "server",
        "proxy-connection",
        "upgrade",
    }
)


@dataclass(frozen=True)
class Received:
    """One request as it reached the proxy: its KMS operation, botocore's
    ``amz-sdk-request`` header (``attempt=N; max=M``, or None), and its JSON body.
    Bodies are kept whole, data keys in Encrypt requests included: test use only."""

    operation: str
    sdk_request: str | None
    body: Mapping[str, Any]


@dataclass(frozen=True)
class _Delay:
    """Hold one request ``seconds`` before forwarding it to moto (a slow KMS)."""

    seconds: float
    operation: str | None

    def applies_to(self, operation: str) -> bool:
        return self.operation is None or self.operation == operation


@dataclass(frozen=True)
class _Fault:
    """One canned KMS error response (JSON 1.1 protocol, as botocore parses it), or a
    DynamoDB one (``dynamodb``: JSON 1.0, see :meth:`FaultProxy.dynamodb_error_next`)."""

    status: int
    error_type: str
    message: str
    operation: str | None  # None: any request
    dynamodb: bool = False
    body: Mapping[str, Any] | None = None  # a JSON body as is (json_error_next)

    def applies_to(self, operation: str) -> bool:
        return self.operation is None or self.operation == operation

    def response(self) -> web.Response:
        if self.body is not None:
            return web.json_response(self.body, status=self.status)
        if self.dynamodb:
            return self._dynamodb_response()
        # botocore's JSON parser takes the error code from the body's ``__type`` (real
        # KMS sends the x-amzn-ErrorType header too). "ThrottlingException" is one of
        # the standard retry mode's throttling codes; 500/502/503/504 are transient.
        body = json.dumps({"__type": self.error_type, "message": self.message})
        return web.Response(
            status=self.status,
            body=body.encode("utf-8"),
            headers={
                "Content-Type": "application/x-amz-json-1.1",
                "x-amzn-ErrorType": self.error_type,
                "x-amzn-RequestId": "fault-proxy",
            },
        )

    def _dynamodb_response(self) -> web.Response:
        # As DynamoDB answers: JSON 1.0, ``__type`` namespaced (botocore keeps what
        # follows the '#'), no x-amzn-ErrorType header, the body's CRC32 in x-amz-crc32
        # (botocore checks it, and retries a mismatch).
        namespaced = self.error_type if "#" in self.error_type else _DYNAMODB + self.error_type
        body = json.dumps({"__type": namespaced, "message": self.message}).encode("utf-8")
        return web.Response(
            status=self.status,
            body=body,
            headers={
                "Content-Type": "application/x-amz-json-1.0",
                "x-amz-crc32": str(zlib.crc32(body)),
                "x-amzn-RequestId": "fault-proxy",
            },
        )


class FaultProxy:
    """Forward HTTP requests to ``upstream`` (e.g. moto's endpoint URL), with faults.

    Use as a context manager (``with FaultProxy(url) as proxy``) and point the client at
    :attr:`url`.
    """

    def __init__(
        self, upstream: str, *, operation_of: Callable[[str, str], str] | None = None
    ) -> None:
        self.upstream = upstream.rstrip("/")
        self._operation_of = operation_of
        self.url = ""
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: concurrent.futures.Future[str] = concurrent.futures.Future()
        # Proxy-loop state: touched only from the proxy's own thread.
        self._faults: collections.deque[_Fault] = collections.deque()
        self._counts: collections.Counter[str] = collections.Counter()
        self._received: list[Received] = []
        self._delays: collections.deque[_Delay] = collections.deque()
        self._in_flight = 0
        self._most_in_flight = 0
        self._released: asyncio.Event | None = None
        self._stopping: asyncio.Event | None = None
        self._session: aiohttp.ClientSession | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> FaultProxy:
        if self._thread is not None:
            raise RuntimeError("a FaultProxy can be started only once")
        self._thread = threading.Thread(target=self._serve, name="fault-proxy", daemon=True)
        self._thread.start()
        self.url = self._ready.result(timeout=_START_TIMEOUT)
        return self

    def stop(self) -> None:
        """Release held requests, close the server and the upstream session, join."""
        thread, loop, stopping = self._thread, self._loop, self._stopping
        if thread is None or loop is None or stopping is None:
            return
        if thread.is_alive():
            loop.call_soon_threadsafe(stopping.set)
        thread.join(timeout=_STOP_TIMEOUT)
        if thread.is_alive():
            raise RuntimeError(f"the fault proxy did not stop within {_STOP_TIMEOUT} s")

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- controls (call from any thread) -----------------------------------------------

    def throttle_next(self, n: int, *, operation: str | None = None) -> None:
        """Answer the next ``n`` requests (for ``operation`` only, if given) with
        HTTP 400 ThrottlingException."""
        fault = _Fault(400, "ThrottlingException", "Rate exceeded", operation)
        self._apply(lambda: self._faults.extend([fault] * n))

    def fail_next(
        self,
        n: int,
        status: int = 500,
        *,
        error_type: str = "KMSInternalException",
        operation: str | None = None,
    ) -> None:
        """Answer the next ``n`` requests (for ``operation`` only, if given) with
        ``status`` (a 5xx) and ``error_type``."""
        fault = _Fault(status, error_type, "Injected server error", operation)
        self._apply(lambda: self._faults.extend([fault] * n))

    def refuse_next(
        self,
        n: int,
        error_type: str = "AccessDeniedException",
        *,
        operation: str | None = None,
    ) -> None:
        """Answer the next ``n`` requests (for ``operation`` only, if given) with HTTP 400
        ``error_type``: an answer, not an outage (KMS is up and says no)."""
        fault = _Fault(400, error_type, "Injected refusal", operation)
        self._apply(lambda: self._faults.extend([fault] * n))

    def dynamodb_error_next(
        self,
        n: int,
        error_type: str,
        status: int = 400,
        *,
        message: str = "Injected DynamoDB error",
        operation: str | None = None,
    ) -> None:
        """Answer the next ``n`` requests (for ``operation`` only, if given) as DynamoDB
        answers an error: ``status`` with a JSON 1.0 body whose ``__type`` is ``error_type``
        (namespaced ``com.amazonaws.dynamodb.v20120810#`` unless it has a '#' already),
        e.g. 400 ProvisionedThroughputExceededException, 500 InternalServerError."""
        fault = _Fault(status, error_type, message, operation, dynamodb=True)
        self._apply(lambda: self._faults.extend([fault] * n))

    def json_error_next(
        self,
        n: int,
        status: int,
        body: Mapping[str, Any],
        *,
        operation: str | None = None,
    ) -> None:
        """Answer the next ``n`` requests (for ``operation`` only, if given) with
        ``status`` and the JSON ``body`` as given (e.g. Vault's ``{"errors": [...]}``)."""
        fault = _Fault(status, "", "", operation, body=dict(body))
        self._apply(lambda: self._faults.extend([fault] * n))

    def slow_next(self, n: int, seconds: float, *, operation: str | None = None) -> None:
        """Hold each of the next ``n`` requests (for ``operation`` only, if given)
        ``seconds`` before forwarding it to moto: a slow, not a failing, KMS."""
        delay = _Delay(seconds, operation)
        self._apply(lambda: self._delays.extend([delay] * n))

    def hang(self, on: bool) -> None:
        """While on, hold every request unanswered; turning it off lets them through."""

        def apply() -> None:
            assert self._released is not None
            if on:
                self._released.clear()
            else:
                self._released.set()

        self._apply(apply)

    def requests(self) -> dict[str, int]:
        """Requests received so far by KMS operation (from ``X-Amz-Target``), faults and
        held requests included."""
        return self._apply(lambda: dict(self._counts))

    def received(self, operation: str | None = None) -> list[Received]:
        """Every request received so far (of ``operation`` only, if given), in order."""
        return self._apply(lambda: [r for r in self._received if operation in (None, r.operation)])

    def most_in_flight(self) -> int:
        """The most requests the proxy was handling at one time (held ones included)."""
        return self._apply(lambda: self._most_in_flight)

    def _apply(self, fn: Callable[[], T]) -> T:
        if self._loop is None or self._thread is None or not self._thread.is_alive():
            raise RuntimeError("the fault proxy is not running")

        async def call() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(_CONTROL_TIMEOUT)

    # -- the proxy's own thread --------------------------------------------------------

    def _serve(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # surface start-up failures to start()
            if not self._ready.done():
                self._ready.set_exception(exc)
            raise

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._released = asyncio.Event()
        self._released.set()
        self._stopping = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=30), auto_decompress=False
        ) as self._session:
            try:
                site = web.TCPSite(runner, "127.0.0.1", 0)
                await site.start()
                host, port = runner.addresses[0][:2]
                self._ready.set_result(f"http://{host}:{port}")
                await self._stopping.wait()
            finally:
                self._released.set()  # held handlers see _stopping and answer 503
                await runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self._in_flight += 1
        self._most_in_flight = max(self._most_in_flight, self._in_flight)
        try:
            return await self._answer(request)
        finally:
            self._in_flight -= 1

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        assert self._released is not None
        assert self._stopping is not None
        assert self._session is not None
        if self._operation_of is not None:
            operation = self._operation_of(request.method, request.path)
        else:
            operation = request.headers.get("X-Amz-Target", "").rpartition(".")[2] or "<none>"
        self._counts[operation] += 1
        body = await request.read()
        self._received.append(
            Received(operation, request.headers.get("amz-sdk-request"), _json_body(body))
        )
        await self._released.wait()
        if self._stopping.is_set():
            return web.Response(status=503, text="fault proxy stopping")
        fault = next((f for f in self._faults if f.applies_to(operation)), None)
        if fault is not None:
            self._faults.remove(fault)  # the first equal one, which is this one
            return fault.response()
        delay = next((d for d in self._delays if d.applies_to(operation)), None)
        if delay is not None:
            self._delays.remove(delay)
            await asyncio.sleep(delay.seconds)
        headers = _end_to_end(request.headers)
        try:
            async with self._session.request(
                request.method,
                self.upstream + request.rel_url.raw_path_qs,
                headers=headers,
                data=body,
                allow_redirects=False,
            ) as upstream:
                payload = await upstream.read()
                out = _end_to_end(upstream.headers)
                return web.Response(status=upstream.status, body=payload, headers=out)
        except (aiohttp.ClientError, TimeoutError) as exc:
            return web.Response(status=502, text=f"fault proxy: upstream failed: {exc!r}")


async def wait_for(predicate: Callable[[], bool], what: str) -> None:
    """Poll ``predicate`` (e.g. on :meth:`FaultProxy.requests`) until it holds, a bounded
    number of times: the proxy answers in its own thread, so a test's loop must keep
    running (its client sends the requests) while it waits."""
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


def _json_body(body: bytes) -> Mapping[str, Any]:
    """A KMS request's JSON body (AWS JSON 1.1), or {} for anything else."""
    try:
        parsed = json.loads(body) if body else {}
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _end_to_end(headers: Mapping[str, str]) -> CIMultiDict[str]:
    """The headers without hop-by-hop ones; Host stays (SigV4 signed it)."""
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in _HOP_HEADERS)
