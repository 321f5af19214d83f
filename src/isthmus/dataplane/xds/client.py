"""AdsClient: the proxy's one xDS stream to the control plane (ADS, SotW or delta).

What it does, following Envoy's xDS protocol:

* Subscribes to CDS and LDS by wildcard; EDS and RDS names follow what accepted
  clusters and listeners reference (``XdsState.subscriptions``), and the client sends a
  new request (SotW) or a subscribe/unsubscribe diff (delta) whenever those sets change.
  Resources no longer subscribed are dropped from the state.
* Validates a whole response before applying anything. One rejected resource rejects
  the response: SotW NACK = previous ``version_info`` + the response's nonce +
  ``error_detail`` (google.rpc.Status INVALID_ARGUMENT naming each resource and field);
  delta NACK = the nonce + ``error_detail``. Accepted responses are ACKed with their
  version (SotW) or nonce (delta). The accepted config of that type stays as it was.
* Clusters warm until their endpoints arrive and listeners until their routes and
  clusters exist, or ``initial_fetch_timeout`` passes, or (delta) the server reports
  what they wait for as removed (see ``state``).
* The stream runs forever: if the control plane is down or the stream breaks, it
  reconnects with exponential backoff and full jitter (0.5 s .. 30 s, reset by a good
  response) and resyncs (SotW: full state per type, removals inferred for LDS/CDS;
  delta: ``initial_resource_versions``) without dropping what is applied. ``start()``
  never waits for the control plane, so a proxy starts (with no dynamic config) while
  the control plane is away.
* Responses for type URLs without a handler are ignored with a warning; resources that
  cannot be decoded are NACKed under their name (or ``resources[i]``).

Requests go through a per-stream queue consumed by the gRPC request iterator; responses
are handled synchronously in the read loop, so ACK order equals response order.
Neighbours: ``state`` (accepted config, warming), ``handlers``, ``backoff``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import code_pb2, status_pb2

from isthmus.dataplane.xds import types
from isthmus.dataplane.xds.backoff import Backoff
from isthmus.dataplane.xds.errors import ConfigRejected, as_rejection
from isthmus.dataplane.xds.handlers import Resource, ResourceHandler, default_handlers
from isthmus.dataplane.xds.state import NackInfo, XdsState

log = logging.getLogger(__name__)

Mode = Literal["sotw", "delta"]

#: Channel defaults: big config pushes, no transparent gRPC retries (we resync ourselves).
#: Keepalive pings every 5 min (gRPC servers' default minimum, so no GOAWAY for pinging
#: too often) notice a control plane that vanished without closing the connection.
DEFAULT_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_receive_message_length", 128 * 1024 * 1024),
    ("grpc.enable_retries", 0),
    ("grpc.keepalive_time_ms", 300_000),
    ("grpc.keepalive_timeout_ms", 20_000),
)
_MAX_ERROR_DETAIL = 8192


@dataclass(slots=True)
class ClientStats:
    streams: int = 0  # streams opened
    responses: int = 0
    acks: int = 0
    nacks: int = 0
    ignored: int = 0  # responses for unknown type URLs
    reconnects: int = 0  # backoff waits
    last_delay: float = 0.0  # last backoff delay, seconds
    last_error: str = ""


@dataclass(frozen=True, slots=True)
class _Decoded:
    name: str
    message: Message
    raw: bytes
    version: str
    references: Mapping[str, frozenset[str]]


class AdsClient:
    def __init__(
        self,
        address: str,
        node: base_pb2.Node,
        handlers: Mapping[str, ResourceHandler] | Iterable[ResourceHandler] | None = None,
        mode: Mode = "sotw",
        *,
        state: XdsState | None = None,
        initial_fetch_timeout: float = 15.0,
        backoff: Backoff | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
        metadata: Sequence[tuple[str, str]] = (),
        node_on_first_request_only: bool = True,
    ) -> None:
        if mode not in ("sotw", "delta"):
            raise ValueError(f"mode must be 'sotw' or 'delta', got {mode!r}")
        if state is None:
            if handlers is None:
                hs: Mapping[str, ResourceHandler] = default_handlers()
            elif isinstance(handlers, Mapping):
                hs = handlers
            else:
                hs = {h.type_url: h for h in handlers}
            state = XdsState(hs, initial_fetch_timeout=initial_fetch_timeout)
        elif handlers is not None:
            raise ValueError("pass handlers or state (which has its handlers), not both")
        self.address = address
        self.node = node
        self.mode: Mode = mode
        self.state = state
        self.backoff = backoff or Backoff()
        self.stats = ClientStats()
        self.connected = False
        self._credentials = credentials
        self._channel_options = tuple(DEFAULT_CHANNEL_OPTIONS) + tuple(channel_options)
        self._metadata = tuple(metadata)
        self._node_first_only = node_on_first_request_only
        self._session: _Session | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._timer_wake = asyncio.Event()
        self._waiters: set[asyncio.Future[None]] = set()
        self._unsub = state.on_update(self._notify)

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        """Run the client in the background; returns at once (control plane or not)."""
        if self._task is None or self._task.done():
            self._stop.clear()
            self._task = asyncio.get_running_loop().create_task(self.run(), name="xds-ads-client")
        return self._task

    async def stop(self) -> None:
        self._stop.set()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # we were cancelled ourselves: do not swallow it

    async def run(self) -> None:
        """Connect, stream, and reconnect with backoff until :meth:`stop`."""
        timer = asyncio.get_running_loop().create_task(self._warming_loop(), name="xds-warming")
        try:
            while not self._stop.is_set():
                try:
                    await self._stream_once()
                    self.stats.last_error = "stream closed by the control plane"
                    log.info("xDS stream to %s closed by the server; reconnecting", self.address)
                except grpc.aio.AioRpcError as e:
                    self.stats.last_error = f"{e.code().name}: {e.details()}"
                    log.warning(
                        "xDS stream to %s failed: %s (is the control plane running?)",
                        self.address, self.stats.last_error,
                    )
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    self.stats.last_error = f"{type(e).__name__}: {e}"
                    log.exception("xDS stream to %s broke", self.address)
                if self._stop.is_set():
                    break
                delay = self.backoff.next()
                self.stats.reconnects += 1
                self.stats.last_delay = delay
                self._notify()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._stop.wait()
        finally:
            timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await timer
            self.connected = False
            self._session = None

    # -- waiting (tests, readiness probes) ------------------------------------------------

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``predicate()`` holds, re-checked after every state/stream event."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.add(fut)
            try:
                async with asyncio.timeout(remaining):
                    await fut
            except TimeoutError:
                return predicate()
            finally:
                self._waiters.discard(fut)
        return True

    async def wait_ready(self, timeout: float) -> bool:
        """True once the initial CDS/LDS config has arrived and warmed."""
        return await self.wait_for(lambda: self.state.ready, timeout)

    def resubscribe(self) -> None:
        """Re-read ``state.subscriptions`` and send what changed (also done after each
        response; call it when something outside the state changes what is needed)."""
        if self._session is not None:
            self._session.sync_subscriptions()

    def _notify(self) -> None:
        self._timer_wake.set()
        for fut in list(self._waiters):
            if not fut.done():
                fut.set_result(None)

    # -- one stream -----------------------------------------------------------------------

    def _channel(self) -> grpc.aio.Channel:
        if self._credentials is not None:
            return grpc.aio.secure_channel(self.address, self._credentials, self._channel_options)
        return grpc.aio.insecure_channel(self.address, self._channel_options)

    async def _stream_once(self) -> None:
        queue: asyncio.Queue[Message | None] = asyncio.Queue()

        async def requests() -> AsyncIterator[Message]:
            while True:
                item = await queue.get()
                if item is None:
                    return
                yield item

        channel = self._channel()
        call: Any = None
        try:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            method = (
                stub.StreamAggregatedResources if self.mode == "sotw" else stub.DeltaAggregatedResources
            )
            session: _Session = (_SotwSession if self.mode == "sotw" else _DeltaSession)(self, queue)
            self._session = session
            self.stats.streams += 1
            session.start()
            call = method(requests(), metadata=self._metadata or None)
            async for response in call:
                if not self.connected:
                    self.connected = True
                    log.info("xDS stream to %s established (%s)", self.address, self.mode)
                self.backoff.reset()
                self.stats.responses += 1
                session.handle(response)
                self._notify()
        finally:
            self.connected = False
            self._session = None
            queue.put_nowait(None)
            if call is not None:
                call.cancel()
            await channel.close()
            self._notify()

    async def _warming_loop(self) -> None:
        """Activates warming resources when ``initial_fetch_timeout`` runs out."""
        clock = self.state.clock
        while True:
            deadline = self.state.next_warming_deadline()
            self._timer_wake.clear()
            timeout = None if deadline is None else max(0.0, deadline - clock())
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
                # cancellation that races with the event being set (the task then
                # never ends).
                async with asyncio.timeout(timeout):
                    await self._timer_wake.wait()
            except TimeoutError:
                self.state.expire_warming()

    # -- decoding, shared by both protocols ------------------------------------------------

    def _decode(
        self,
        handler: ResourceHandler,
        type_url: str,
        packed: any_pb2.Any,
        label: str,
        outer_name: str,
        version: str,
    ) -> _Decoded:
        """Unpack, check and validate one resource; raises ConfigRejected."""
        who = outer_name or label
        if packed.type_url == types.RESOURCE_WRAPPER:  # SotW servers may wrap resources
            wrapper = discovery_pb2.Resource()
            try:
                wrapper.ParseFromString(packed.value)
            except DecodeError as e:
                raise ConfigRejected(who, "", f"cannot decode the Resource wrapper: {e}") from e
            return self._decode(
                handler, type_url, wrapper.resource, label, wrapper.name or outer_name,
                wrapper.version or version,
            )
        if packed.type_url != type_url:
            raise ConfigRejected(
                who, "type_url", f"resource has type {packed.type_url!r} in a {type_url} response"
            )
        msg = handler.message_type()
        try:
            msg.ParseFromString(packed.value)
        except DecodeError as e:
            raise ConfigRejected(who, "", f"cannot decode {types.kind(type_url)}: {e}") from e
        name = handler.resource_name(msg)
        if outer_name and name != outer_name:
            raise ConfigRejected(
                outer_name, "name", f"the resource inside is named {name!r}"
            )
        try:
            handler.validate(name, msg)
            refs = handler.references(name, msg)
        except ConfigRejected:
            raise
        except Exception as e:
            raise as_rejection(e, name) from e
        return _Decoded(name, msg, bytes(packed.value), version, refs)

    def _error_detail(self, type_url: str, errors: list[ConfigRejected]) -> status_pb2.Status:
        kind = types.kind(type_url)
        parts = [
            f"{kind} {e.resource_name!r}: {e.field_path or '<root>'}: {e.reason}" for e in errors
        ]
        text = "; ".join(parts)
        if len(text) > _MAX_ERROR_DETAIL:
            text = text[: _MAX_ERROR_DETAIL - 20] + f" ... ({len(parts)} errors)"
        return status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=text)

    def _record_nack(
        self, type_url: str, version: str, nonce: str, errors: list[ConfigRejected],
        detail: status_pb2.Status, failed: Mapping[str, any_pb2.Any],
    ) -> None:
        self.stats.nacks += 1
        log.warning(
            "rejecting %s version %r (nonce %s); keeping the previous config: %s",
            types.short_name(type_url), version, nonce, detail.message,
        )
        nack = NackInfo(type_url, version, nonce, detail.message, tuple(errors), self.state.wall())
        self.state.record_nack(type_url, nack, failed)

    def _resources(self, decoded: Iterable[_Decoded], type_url: str) -> dict[str, Resource]:
        """Decoded resources that differ from what is accepted (new bytes or version).

        For EDS/RDS, resources nobody references (not subscribed) are skipped.
        """
        have = self.state.accepted(type_url)
        want = None if self._wildcard(type_url) else self.state.subscriptions(type_url)
        now = self.state.wall()
        out: dict[str, Resource] = {}
        for d in decoded:
            if want is not None and d.name not in want:
                log.debug("ignoring unrequested %s %r", types.short_name(type_url), d.name)
                continue
            old = have.get(d.name)
            if old is not None and old.raw == d.raw and old.version == d.version:
                continue
            out[d.name] = Resource(d.name, d.version, d.message, d.raw, now, d.references)
        return out

    def _wildcard(self, type_url: str) -> bool:
        return type_url in types.WILDCARD_TYPES or bool(
            getattr(self.state.handlers.get(type_url), "wildcard", False)
        )


class _Session:
    """Per-stream protocol state; subclasses speak SotW or delta."""

    def __init__(self, client: AdsClient, queue: asyncio.Queue[Message | None]) -> None:
        self.client = client
        self.state = client.state
        self.queue = queue
        self._node_sent = False

    def start(self) -> None:
        raise NotImplementedError

    def handle(self, response: Any) -> None:
        raise NotImplementedError

    def sync_subscriptions(self) -> None:
        raise NotImplementedError

    def _send(self, req: Any) -> None:
        if not self._node_sent or not self.client._node_first_only:
            req.node.CopyFrom(self.client.node)
            self._node_sent = True
        self.queue.put_nowait(req)

    def _named_types(self) -> list[str]:
        return [t for t in self.state.type_urls() if not self.client._wildcard(t)]

    def _drop_unsubscribed(self, type_url: str, want: frozenset[str]) -> None:
        extra = set(self.state.accepted(type_url)) - want
        if extra:
            log.debug("dropping %s no longer referenced: %s", types.short_name(type_url), extra)
            self.state.commit(type_url, None, {}, extra)

    def _handler(self, type_url: str) -> ResourceHandler | None:
        h = self.state.handlers.get(type_url)
        if h is None:
            self.client.stats.ignored += 1
            log.warning("ignoring xDS response for unknown type %r (no handler)", type_url)
        return h


class _SotwSession(_Session):
    def __init__(self, client: AdsClient, queue: asyncio.Queue[Message | None]) -> None:
        super().__init__(client, queue)
        self.nonce: dict[str, str] = {}
        self.sent: dict[str, frozenset[str]] = {}  # names last requested, per type

    def start(self) -> None:
        for t in self.state.type_urls():
            if self.client._wildcard(t):
                self._request(t, frozenset())
            else:
                want = self.state.subscriptions(t)
                if want:
                    self._request(t, want)

    def _request(
        self, type_url: str, names: frozenset[str], *, version: str | None = None,
        error: status_pb2.Status | None = None,
    ) -> None:
        req = discovery_pb2.DiscoveryRequest(
            version_info=self.state.version_info(type_url) if version is None else version,
            resource_names=sorted(names),
            type_url=type_url,
            response_nonce=self.nonce.get(type_url, ""),
        )
        if error is not None:
            req.error_detail.CopyFrom(error)
        self.sent[type_url] = names
        self._send(req)

    def handle(self, resp: discovery_pb2.DiscoveryResponse) -> None:
        t = resp.type_url
        handler = self._handler(t)
        if handler is None:
            return
        self.nonce[t] = resp.nonce
        decoded: list[_Decoded] = []
        errors: list[ConfigRejected] = []
        failed: dict[str, any_pb2.Any] = {}
        seen: set[str] = set()
        for i, packed in enumerate(resp.resources):
            try:
                d = self.client._decode(handler, t, packed, f"resources[{i}]", "", resp.version_info)
            except ConfigRejected as e:
                errors.append(e)
                failed[e.resource_name] = packed
                continue
            if d.name in seen:
                errors.append(ConfigRejected(d.name, "name", "duplicate name in one response"))
                continue
            seen.add(d.name)
            decoded.append(d)
        names = self.sent.get(t)
        if names is None:  # a type we have not asked for on this stream
            names = frozenset() if self.client._wildcard(t) else self.state.subscriptions(t)
        if errors:
            detail = self.client._error_detail(t, errors)
            self._request(t, names, version=self.state.version_info(t), error=detail)
            self.client._record_nack(t, resp.version_info, resp.nonce, errors, detail, failed)
            return
        updated = self.client._resources(decoded, t)
        removed: set[str] = set()
        if self.client._wildcard(t):
            # SotW: a wildcard response is the whole set; anything missing is gone.
            removed = set(self.state.accepted(t)) - seen
        self.state.commit(t, resp.version_info, updated, removed, replace_errors=True)
        self._request(t, names, version=resp.version_info)  # ACK
        self.client.stats.acks += 1
        self.sync_subscriptions()

    def sync_subscriptions(self) -> None:
        for t in self._named_types():
            want = self.state.subscriptions(t)
            have = self.sent.get(t)
            if (have is None and want) or (have is not None and have != want):
                self._request(t, want)
            self._drop_unsubscribed(t, want)


class _DeltaSession(_Session):
    def __init__(self, client: AdsClient, queue: asyncio.Queue[Message | None]) -> None:
        super().__init__(client, queue)
        self.subscribed: dict[str, frozenset[str]] = {}

    def start(self) -> None:
        for t in self.state.type_urls():
            req = discovery_pb2.DeltaDiscoveryRequest(type_url=t)
            have = self.state.accepted(t)
            if self.client._wildcard(t):
                req.resource_names_subscribe.append(types.WILDCARD)
                known = {n: r.version for n, r in have.items()}
            else:
                want = self.state.subscriptions(t)
                if not want:
                    continue
                self.subscribed[t] = want
                req.resource_names_subscribe.extend(sorted(want))
                known = {n: r.version for n, r in have.items() if n in want}
            req.initial_resource_versions.update(known)
            self._send(req)

    def handle(self, resp: discovery_pb2.DeltaDiscoveryResponse) -> None:
        t = resp.type_url
        handler = self._handler(t)
        if handler is None:
            return
        decoded: list[_Decoded] = []
        errors: list[ConfigRejected] = []
        failed: dict[str, any_pb2.Any] = {}
        seen: set[str] = set()
        for i, r in enumerate(resp.resources):
            label = r.name or f"resources[{i}]"
            if not r.HasField("resource"):
                continue  # a name-only entry (TTL heartbeat): nothing to apply
            try:
                d = self.client._decode(handler, t, r.resource, label, r.name, r.version)
            except ConfigRejected as e:
                errors.append(e)
                failed[e.resource_name] = r.resource
                continue
            if d.name in seen:
                errors.append(ConfigRejected(d.name, "name", "duplicate name in one response"))
                continue
            seen.add(d.name)
            decoded.append(d)
        removed = set(resp.removed_resources) | {rn.name for rn in resp.removed_resource_names}
        if errors:
            detail = self.client._error_detail(t, errors)
            req = discovery_pb2.DeltaDiscoveryRequest(type_url=t, response_nonce=resp.nonce)
            req.error_detail.CopyFrom(detail)
            self._send(req)
            self.client._record_nack(
                t, resp.system_version_info, resp.nonce, errors, detail, failed
            )
            return
        updated = self.client._resources(decoded, t)
        self.state.commit(t, resp.system_version_info, updated, removed - seen)
        self._send(discovery_pb2.DeltaDiscoveryRequest(type_url=t, response_nonce=resp.nonce))
        self.client.stats.acks += 1
        self.sync_subscriptions()

    def sync_subscriptions(self) -> None:
        for t in self._named_types():
            want = self.state.subscriptions(t)
            have = self.subscribed.get(t, frozenset())
            add, drop = want - have, have - want
            if add or drop:
                req = discovery_pb2.DeltaDiscoveryRequest(type_url=t)
                req.resource_names_subscribe.extend(sorted(add))
                req.resource_names_unsubscribe.extend(sorted(drop))
                self.subscribed[t] = want
                self._send(req)
            self._drop_unsubscribed(t, want)
