"""NATS JetStream output (official ``nats-py`` client).

Each record is published to ``tapio.evidence.<type>`` with headers ``Nats-Msg-Id`` (the
occurrence id: JetStream drops a re-publish of the same id inside the stream's duplicate
window, so our retries and an agent's re-sent batch never store twice) and ``Tapio-Node``. A
record counts as delivered only when JetStream acknowledged it, i.e. it is stored.

The stream is created when missing (subjects ``tapio.evidence.>``, file storage, bounded by
``max_age`` and ``max_bytes``, oldest discarded first); an existing stream is used as it is, so
an operator's own settings win. Several controller replicas may race to create it: NATS accepts
an identical create, and a loser that finds it existing just uses it.

The client reconnects on its own (forever, with its own backoff); while it is away publishes
time out and the lane retries them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Final

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError
from yarl import URL

from tapio.controller.forward import (
    NATS_DEFAULT_DUPLICATE_WINDOW,
    NATS_DEFAULT_MAX_AGE,
    NATS_DEFAULT_MAX_BYTES,
    NATS_DEFAULT_STREAM,
)
from tapio.controller.forward.record import SUBJECT_PREFIX, Record

DEFAULT_STREAM: Final = NATS_DEFAULT_STREAM
DEFAULT_MAX_AGE: Final = NATS_DEFAULT_MAX_AGE
DEFAULT_MAX_BYTES: Final = NATS_DEFAULT_MAX_BYTES
DEFAULT_DUPLICATE_WINDOW: Final = NATS_DEFAULT_DUPLICATE_WINDOW
PUBLISH_TIMEOUT: Final = 5.0
CONNECT_TIMEOUT: Final = 3.0
NODE_HEADER: Final = "Tapio-Node"


class NatsOutput:
    def __init__(
        self,
        url: str,
        *,
        stream: str = DEFAULT_STREAM,
        max_age: float = DEFAULT_MAX_AGE,
        max_bytes: int = DEFAULT_MAX_BYTES,
        duplicate_window: float = DEFAULT_DUPLICATE_WINDOW,
        publish_timeout: float = PUBLISH_TIMEOUT,
        logger: Any = None,
    ) -> None:
        parsed = URL(url)
        if parsed.scheme != "nats" or not parsed.host:
            raise ValueError("not a nats://HOST:PORT URL (credentials, if any, not shown)")
        self.url = url
        # The metric label and log name never carry credentials from the URL.
        self.name = str(parsed.with_user(None).with_password(None).with_path(""))
        self.stream = stream
        self.max_age = max_age
        self.max_bytes = max_bytes
        self.duplicate_window = duplicate_window
        self.publish_timeout = publish_timeout
        self._log = logger
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._stream_ready = False
        self.duplicates = 0

    async def _on_error(self, exc: Exception) -> None:
        if self._log is not None:
            self._log.debug("nats client error", output=self.name, reason=f"{type(exc).__name__}")

    async def connect(self) -> None:
        if self._nc is None or self._nc.is_closed:
            self._nc = await asyncio.wait_for(
                nats.connect(
                    servers=[self.url],
                    connect_timeout=CONNECT_TIMEOUT,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    error_cb=self._on_error,
                    name="tapio-controller",
                ),
                timeout=CONNECT_TIMEOUT * 2,
            )
            self._js = self._nc.jetstream(timeout=self.publish_timeout)
        await self._ensure_stream()

    async def _ensure_stream(self) -> None:
        if self._stream_ready:
            return
        assert self._js is not None
        try:
            await self._js.stream_info(self.stream)
        except NotFoundError:
            config = StreamConfig(
                name=self.stream,
                subjects=[SUBJECT_PREFIX + ">"],
                storage=StorageType.FILE,
                discard=DiscardPolicy.OLD,
                max_age=self.max_age,
                max_bytes=self.max_bytes,
                duplicate_window=self.duplicate_window,
            )
            try:
                await self._js.add_stream(config)
            except Exception:
                await self._js.stream_info(self.stream)  # a replica created it meanwhile
        self._stream_ready = True

    async def _publish(self, record: Record) -> bool:
        assert self._js is not None
        ack = await self._js.publish(
            record.subject,
            record.body,
            stream=self.stream,
            headers={"Nats-Msg-Id": record.id, NODE_HEADER: record.node_name},
        )
        if ack.duplicate:
            self.duplicates += 1
        return True

    async def deliver(self, records: Sequence[Record]) -> list[bool]:
        await self._ensure_stream()
        results = await asyncio.gather(*(self._publish(r) for r in records), return_exceptions=True)
        ok = [r is True for r in results]
        if not all(ok):
            # The stream may have been deleted or the server restarted empty: check it again
            # (and re-create it) before the retry.
            self._stream_ready = False
        return ok

    async def close(self) -> None:
        if self._nc is not None and not self._nc.is_closed:
            await self._nc.close()
