"""A real aioboto3 session that logs its clients' creation, opening and closing: how the
KMS tests observe client lifetimes (one client per region, evictions, closing on exit)
without faking any part of the keyring."""

from __future__ import annotations

from typing import Any

import aioboto3


class _TrackedClientContext:
    def __init__(self, inner: Any, events: list[tuple[str, str]], region: str) -> None:
        self._inner, self._events, self._region = inner, events, region

    async def __aenter__(self) -> Any:
        client = await self._inner.__aenter__()
        self._events.append(("open", self._region))
        return client

    async def __aexit__(self, *exc_info: Any) -> Any:
        try:
            return await self._inner.__aexit__(*exc_info)
        finally:
            self._events.append(("close", self._region))


class TrackingSession:
    """``session`` is a real ``aioboto3.Session``; ``created`` lists the region of each
    ``client()`` call, ``events`` each ("open"|"close", region) in order."""

    def __init__(self, **session_kwargs: Any) -> None:
        self.session = aioboto3.Session(**session_kwargs)
        self.created: list[str] = []
        self.events: list[tuple[str, str]] = []
        original = self.session.client

        def client(service_name: str, **kwargs: Any) -> _TrackedClientContext:
            region = str(kwargs.get("region_name"))
            self.created.append(region)
            return _TrackedClientContext(original(service_name, **kwargs), self.events, region)

        self.session.client = client

    @property
    def opened(self) -> list[str]:
        """The region of each client opened, in order."""
        return [region for kind, region in self.events if kind == "open"]

    @property
    def open_clients(self) -> int:
        return sum(1 if kind == "open" else -1 for kind, _ in self.events)

    def most_open_at_once(self) -> int:
        most = current = 0
        for kind, _ in self.events:
            current += 1 if kind == "open" else -1
            most = max(most, current)
        return most
