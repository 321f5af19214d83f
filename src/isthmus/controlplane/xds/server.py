"""The ADS gRPC server: serves each node's :class:`XdsSnapshot` from the
:class:`SnapshotCache` over ``AggregatedDiscoveryService`` (SotW
``StreamAggregatedResources`` and incremental ``DeltaAggregatedResources``), plus the
single-type CDS/EDS/LDS/RDS/SDS services, all sharing one stream engine.

Protocol decisions (Envoy's xDS protocol doc):

* One response in flight per type and stream: after sending, the type waits for the
  ACK/NACK of that nonce before sending again. Snapshot changes meanwhile are coalesced,
  and the next response carries the latest state. This is the per-stream backpressure;
  together with a bounded request inbox and awaited writes, a slow proxy costs memory
  proportional to one snapshot, never a queue.
* SotW: a request whose ``response_nonce`` is not the latest one sent for its type is
  stale and ignored entirely. ``error_detail`` marks a NACK: it is recorded in status,
  the last ACKed version stays, and nothing is re-sent until the snapshot or the
  subscription changes (no NACK loop). Wildcard is ``"*"`` for any type, or (legacy) an
  empty name list for LDS/CDS until the client names resources.
* Delta: subscribe/unsubscribe apply on every request (nonce or not); ``"*"`` toggles the
  wildcard; a first request with no names is a legacy wildcard for LDS/CDS;
  ``initial_resource_versions`` seeds what the client already has, so a reconnect sends
  only differences. Removed resources and subscribed names that do not exist are sent in
  ``removed_resources``.
* Only resources that changed are sent (delta) and only types whose subscribed view
  changed get a response (SotW), comparing per-resource hashes.
* Unknown type URLs are logged and ignored. A request without a type URL on ADS, a first
  request without ``node.id``, or undecodable bytes end that stream with an error status;
  they never affect other streams.

Responses are written as pre-encoded bytes (see ``wire``): per-resource serialization is
done once per snapshot, shared by every stream. Neighbours: ``cache`` (snapshots,
watches, status), ``snapshot``, ``types``.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf.message import Message

from isthmus.controlplane.xds import types, wire
from isthmus.controlplane.xds.cache import SnapshotCache, SnapshotProvider
from isthmus.controlplane.xds.snapshot import XdsSnapshot
from isthmus.controlplane.xds.status import ConnectionStatus
from isthmus.controlplane.xds.tasks import TaskSet

log = logging.getLogger(__name__)

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"

#: Single-type services: (service, SotW method, delta method, type URL).
SINGLE_TYPE_SERVICES = (
    (
        "envoy.service.cluster.v3.ClusterDiscoveryService",
        "StreamClusters",
        "DeltaClusters",
        types.CLUSTER,
    ),
    (
        "envoy.service.endpoint.v3.EndpointDiscoveryService",
        "StreamEndpoints",
        "DeltaEndpoints",
        types.ENDPOINT,
    ),
    (
        "envoy.service.listener.v3.ListenerDiscoveryService",
        "StreamListeners",
        "DeltaListeners",
        types.LISTENER,
    ),
    ("envoy.service.route.v3.RouteDiscoveryService", "StreamRoutes", "DeltaRoutes", types.ROUTE),
    (
        "envoy.service.secret.v3.SecretDiscoveryService",
        "StreamSecrets",
        "DeltaSecrets",
        types.SECRET,
    ),
)

_INBOX_MAX = 64  # requests read ahead per stream before reading pauses (HTTP/2 flow control)
_MAX_NAMES = 100_000  # subscribed names per type and stream
_nonces = itertools.count(1)


def _serialize(response: bytes | Message) -> bytes:
    return response if isinstance(response, bytes) else response.SerializeToString()


class _StreamError(Exception):
    """Ends one stream with a gRPC status; the message tells the client what to fix."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code = code
        self.details = details


class _Eof:
    pass


_EOF = _Eof()


# In SotW, a response for these types need not repeat unchanged resources (leaving one
# out does not remove it); LDS/CDS responses must always be complete.
_INCREMENTAL_SOTW = frozenset({types.ENDPOINT, types.ROUTE})


@dataclass(slots=True)
class _TypeState:
    """Per stream and type: subscription, what was sent, and the response in flight."""

    info: types.TypeInfo
    wildcard: bool = False
    names: frozenset[str] = frozenset()
    legacy_ok: bool = True  # SotW: an empty list still means legacy wildcard
    started: bool = False  # delta: first request seen
    pending_nonce: str = ""  # sent, awaiting ACK/NACK
    last_nonce: str = ""
    last_version: str = ""
    force: bool = False  # respond even if nothing differs (initial request)
    dirty: bool = True  # subscription changed since last evaluation
    evaluated: XdsSnapshot | None = None
    sent_view: Mapping[str, str] | None = None  # SotW: {name: version} last sent
    sent_wildcard: bool = False  # SotW: the last response was the whole type
    # Delta: what the client has. While the stream is a plain wildcard this is the shared
    # ``versions`` mapping of the last snapshot sent (no per-stream copy); ``own_sent``
    # copies it before any per-stream change.
    sent: Mapping[str, str] = field(default_factory=dict)
    sent_owned: bool = True
    missing_reported: set[str] = field(default_factory=set)  # delta

    def own_sent(self) -> dict[str, str]:
        if not self.sent_owned:
            self.sent = dict(self.sent)
            self.sent_owned = True
        return self.sent  # type: ignore[return-value]

    def covers(self, name: str) -> bool:
        return self.wildcard or name in self.names

    def subscription(self) -> str:
        if self.wildcard:
            return "*" if not self.names else f"*+{len(self.names)}"
        return f"{len(self.names)} names"


class _Stream:
    """One ADS (or single-type) stream. Subclasses implement the SotW / delta rules."""

    protocol = ""

    def __init__(
        self,
        server: XdsServer,
        requests: AsyncIterator[Any],
        context: grpc.aio.ServicerContext,
        fixed_type: str | None,
    ) -> None:
        self.server = server
        self.cache = server.cache
        self.requests = requests
        self.context = context
        self.fixed_type = fixed_type
        self.wake = asyncio.Event()
        self.inbox: asyncio.Queue[Any] = asyncio.Queue(_INBOX_MAX)
        self.types: dict[str, _TypeState] = {}
        self.node_id = ""
        self.node: base_pb2.Node | None = None
        self.watch: Any = None
        self.unknown_logged: set[str] = set()
        self.status: ConnectionStatus = self.cache.status.open(self.protocol, context.peer())

    # ---- lifecycle -------------------------------------------------------------------

    async def run(self) -> None:
        reader = self.server._tasks.spawn(self._read(), name=f"xds-read-{self.status.conn_id}")
        try:
            while True:
                await self.wake.wait()
                self.wake.clear()
                while not self.inbox.empty():
                    item = self.inbox.get_nowait()
                    if item is _EOF:
                        log.debug(
                            "%s %s: client closed its side", self.status.conn_id, self.node_id
                        )
                        return
                    if isinstance(item, BaseException):
                        raise _StreamError(
                            grpc.StatusCode.INVALID_ARGUMENT, f"cannot read request: {item}"
                        )
                    await self._accept(item)
                if self.node_id:
                    snap = self.cache.get(self.node_id)
                    if snap is not None:
                        await self._push(snap)
        except _StreamError as e:
            log.warning(
                "%s node=%r: ending stream: %s", self.status.conn_id, self.node_id, e.details
            )
            await self.context.abort(e.code, e.details)
        finally:
            reader.cancel()
            if self.watch is not None:
                self.watch.close()
            self.cache.status.close(self.status)

    async def _read(self) -> None:
        try:
            async for req in self.requests:
                await self.inbox.put(req)
                self.wake.set()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - undecodable request, broken transport
            await self.inbox.put(e)
        else:
            await self.inbox.put(_EOF)
        finally:
            self.wake.set()

    async def _accept(self, req: Any) -> None:
        if not self.node_id:
            if not req.HasField("node") or not req.node.id:
                raise _StreamError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "the first request on a stream must carry node.id (is the proxy bootstrap "
                    "setting node.id?)",
                )
            await self._bind_node(req.node)
        elif req.HasField("node") and req.node.id and req.node.id != self.node_id:
            log.warning(
                "%s: request names node %r but the stream belongs to %r; ignoring the new id",
                self.status.conn_id,
                req.node.id,
                self.node_id,
            )
        type_url = req.type_url or (self.fixed_type or "")
        if not type_url:
            raise _StreamError(grpc.StatusCode.INVALID_ARGUMENT, "ADS requests must set type_url")
        if self.fixed_type is not None and type_url != self.fixed_type:
            raise _StreamError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"this service serves {self.fixed_type}, not {type_url}",
            )
        info = types.type_info(type_url)
        if info is None:
            if type_url not in self.unknown_logged:
                self.unknown_logged.add(type_url)
                log.warning(
                    "%s node=%r: ignoring request for unknown type %r",
                    self.status.conn_id,
                    self.node_id,
                    type_url,
                )
            return
        st = self.types.get(type_url)
        if st is None:
            st = self.types[type_url] = _TypeState(info)
        self._handle(st, req)
        if len(st.names) > _MAX_NAMES:
            raise _StreamError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"subscribed to more than {_MAX_NAMES} {info.short} resources",
            )
        self.status.type(type_url).subscription = st.subscription()

    async def _bind_node(self, node: base_pb2.Node) -> None:
        self.node_id = node.id
        self.node = node
        self.status.set_node(node)
        self.watch = self.cache.watch(node.id, self.wake)
        if self.cache.get(node.id) is None and self.server.provider is not None:
            try:
                result = self.server.provider(node)
                if inspect.isawaitable(result):
                    result = await result
            except Exception:
                log.exception("snapshot provider failed for node %r", node.id)
                result = None
            if result is not None and self.cache.get(node.id) is None:
                try:
                    self.cache.set_snapshot(node.id, result)
                except ValueError as e:
                    log.error("snapshot provider gave node %r an unusable snapshot: %s", node.id, e)

    async def _send(self, st: _TypeState, payload: bytes, version: str, count: int) -> None:
        nonce = str(next(_nonces))
        await self.context.write(payload + self._nonce_field(nonce))
        st.pending_nonce = st.last_nonce = nonce
        st.last_version = version
        st.force = False
        self.status.record_sent(st.info.url, version, nonce, count)
        self.server._responses += 1

    def _record_reply(self, st: _TypeState, req: Any, acked_version: str) -> None:
        nonce = req.response_nonce
        st.pending_nonce = ""
        if req.HasField("error_detail"):
            st.sent_view = None  # the proxy kept its old config: next response is complete
            msg = req.error_detail.message
            self.status.record_nack(st.info.url, st.last_version, nonce, msg, req.error_detail.code)
            log.warning(
                "%s node=%r NACKed %s version %s: %s",
                self.status.conn_id,
                self.node_id,
                st.info.short,
                st.last_version,
                msg,
            )
        else:
            self.status.record_ack(st.info.url, acked_version, nonce)

    # ---- protocol specifics ----------------------------------------------------------

    def _nonce_field(self, nonce: str) -> bytes:
        raise NotImplementedError

    def _handle(self, st: _TypeState, req: Any) -> None:
        raise NotImplementedError

    async def _push(self, snap: XdsSnapshot) -> None:
        raise NotImplementedError


class _SotwStream(_Stream):
    protocol = "sotw"

    def _nonce_field(self, nonce: str) -> bytes:
        return wire.sotw_nonce(nonce)

    def _handle(self, st: _TypeState, req: discovery_pb2.DiscoveryRequest) -> None:
        nonce = req.response_nonce
        if nonce and st.last_nonce:
            if nonce != st.last_nonce:
                log.debug(
                    "%s: stale %s nonce %s (latest %s) ignored",
                    self.status.conn_id,
                    st.info.short,
                    nonce,
                    st.last_nonce,
                )
                return
            if st.pending_nonce:
                self._record_reply(st, req, req.version_info)
        elif not st.last_nonce:
            st.force = True  # initial request for the type: always answer
        names = set(req.resource_names)
        explicit_wildcard = types.WILDCARD in names
        names.discard(types.WILDCARD)
        if req.resource_names:
            wildcard = explicit_wildcard
            st.legacy_ok = False  # once names are given, an empty list means "none"
        else:
            wildcard = st.info.wildcard and st.legacy_ok
        frozen = frozenset(names)
        if wildcard != st.wildcard or frozen != st.names:
            st.wildcard, st.names, st.dirty = wildcard, frozen, True

    async def _push(self, snap: XdsSnapshot) -> None:
        for url in types.push_order(self.types):
            st = self.types[url]
            if st.pending_nonce:
                continue
            if not st.force and not st.dirty and st.evaluated is snap:
                continue
            version = snap.version(url)
            if st.wildcard and st.sent_wildcard and not st.force and version == st.last_version:
                st.evaluated, st.dirty = snap, False  # whole type, same hash: nothing new
                continue
            if (url in _INCREMENTAL_SOTW and not st.wildcard and not st.force
                    and st.sent_view is not None and not st.sent_wildcard):
                # EDS/RDS are incremental even in SotW (resources left out of a response
                # are unchanged, per the xDS protocol): send only what changed, so one
                # endpoint change costs one ClusterLoadAssignment, not all of them.
                versions = snap.prepared(url).versions
                current = {n: versions[n] for n in st.names if n in versions}
                changed = frozenset(n for n, v in current.items() if st.sent_view.get(n) != v)
                st.evaluated, st.dirty = snap, False
                st.sent_view = current
                if changed:
                    body, _ = snap.sotw_body(url, changed)
                    await self._send(st, body, version, len(changed))
                continue
            body, view = snap.sotw_body(url, None if st.wildcard else st.names)
            st.evaluated, st.dirty = snap, False
            if not st.force and view == st.sent_view:
                continue
            st.sent_view, st.sent_wildcard = view, st.wildcard
            await self._send(st, body, version, len(view))


class _DeltaStream(_Stream):
    protocol = "delta"

    def _nonce_field(self, nonce: str) -> bytes:
        return wire.ld_str(wire.DELTA_NONCE, nonce)

    def _handle(self, st: _TypeState, req: discovery_pb2.DeltaDiscoveryRequest) -> None:
        nonce = req.response_nonce
        if nonce and st.pending_nonce:
            if nonce == st.pending_nonce:
                self._record_reply(st, req, st.last_version)
            else:
                log.debug(
                    "%s: stale %s nonce %s (pending %s)",
                    self.status.conn_id,
                    st.info.short,
                    nonce,
                    st.pending_nonce,
                )
        subscribe = list(req.resource_names_subscribe)
        unsubscribe = list(req.resource_names_unsubscribe)
        wildcard, names = st.wildcard, set(st.names)
        if not st.started:
            st.started = True
            wildcard = types.WILDCARD in subscribe or (not subscribe and st.info.wildcard)
            st.sent, st.sent_owned = dict(req.initial_resource_versions), True
            st.force = wildcard  # a wildcard subscriber learns "nothing yet" too
            st.dirty = True
        for n in subscribe:
            if n == types.WILDCARD:
                wildcard = True
            else:
                names.add(n)
        for n in unsubscribe:
            if n == types.WILDCARD:
                wildcard = False
            else:
                names.discard(n)
        if wildcard != st.wildcard or names != st.names:
            st.wildcard, st.names, st.dirty = wildcard, frozenset(names), True
            # The client forgets what it no longer subscribes to.
            dropped = [n for n in st.sent if not st.covers(n)]
            if dropped:
                sent = st.own_sent()
                for n in dropped:
                    del sent[n]
            st.missing_reported &= names
        if subscribe and not st.wildcard:
            # A re-subscribed name that does not exist is reported again.
            st.missing_reported.difference_update(subscribe)
            st.dirty = True

    async def _push(self, snap: XdsSnapshot) -> None:
        for url in types.push_order(self.types):
            st = self.types[url]
            if st.pending_nonce or not st.started:
                continue
            if not st.force and not st.dirty and st.evaluated is snap:
                continue
            p = snap.prepared(url)
            items = p.items
            plain_wildcard = st.wildcard and not st.names
            missing: list[str] = []
            if plain_wildcard and not st.sent_owned:
                # The client holds an earlier snapshot's full view: use the shared diff.
                names, gone = p.delta_from(st.sent)
                updates = [items[n] for n in names]
                removed = list(gone)
            else:
                if st.wildcard:
                    candidates = sorted(set(items) | st.names) if st.names else sorted(items)
                else:
                    candidates = sorted(st.names)
                updates = []
                for n in candidates:
                    r = items.get(n)
                    if r is None:
                        if n not in st.sent and n not in st.missing_reported:
                            missing.append(n)
                    elif st.sent.get(n) != r.version:
                        updates.append(r)
                removed = sorted(n for n in st.sent if n not in items and st.covers(n))
                removed.extend(missing)
            st.evaluated, st.dirty = snap, False
            if not (updates or removed or st.force):
                if plain_wildcard:
                    st.sent, st.sent_owned = p.versions, False  # same content, shared
                continue
            if plain_wildcard:
                st.sent, st.sent_owned = p.versions, False  # exactly the whole type now
            else:
                sent = st.own_sent()
                for r in updates:
                    sent[r.name] = r.version
                for n in removed:
                    sent.pop(n, None)
            st.missing_reported.update(missing)
            payload = wire.delta_response(
                p.version, url, (r.delta_bytes for r in updates), removed, ""
            )
            await self._send(st, payload, p.version, len(updates))


class XdsServer:
    """gRPC ADS server over a :class:`SnapshotCache`.

    ``provider`` (optional) is asked for a snapshot when a node connects and the cache
    has none. ``port=0`` binds an ephemeral port; :meth:`start` returns the bound port.
    """

    def __init__(
        self,
        cache: SnapshotCache,
        provider: SnapshotProvider | None = None,
        port: int = 15010,
        host: str = "0.0.0.0",
        *,
        credentials: grpc.ServerCredentials | None = None,
        options: list[tuple[str, Any]] | None = None,
    ) -> None:
        self.cache = cache
        self.provider = provider
        self.host = host
        self.port = port
        self._credentials = credentials
        self._options = options or [
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.keepalive_permit_without_calls", 1),
        ]
        self._server: grpc.aio.Server | None = None
        self._tasks = TaskSet("xds-server")
        self._active = 0
        self._streams_total = 0
        self._responses = 0

    # ---- public --------------------------------------------------------------------

    async def start(self) -> int:
        if self._server is not None:
            raise RuntimeError("XdsServer already started")
        server = grpc.aio.server(options=self._options)
        server.add_generic_rpc_handlers(self._handlers())
        address = f"{self.host}:{self.port}"
        if self._credentials is not None:
            bound = server.add_secure_port(address, self._credentials)
        else:
            bound = server.add_insecure_port(address)
        if bound == 0:
            raise OSError(f"cannot bind xDS server to {address}: is the port already in use?")
        await server.start()
        self._server = server
        self.port = bound
        log.info("xDS server listening on %s:%d", self.host, bound)
        return bound

    async def stop(self, grace: float | None = 1.0) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        await server.stop(grace)
        await self._tasks.cancel_all()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stats(self) -> dict[str, int]:
        return {
            "active_streams": self._active,
            "streams_total": self._streams_total,
            "responses_total": self._responses,
        }

    # ---- gRPC wiring -----------------------------------------------------------------

    def _handlers(self) -> tuple[grpc.GenericRpcHandler, ...]:
        def sotw(fixed: str | None) -> grpc.RpcMethodHandler:
            return grpc.stream_stream_rpc_method_handler(
                self._method(_SotwStream, fixed),
                request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
                response_serializer=_serialize,
            )

        def delta(fixed: str | None) -> grpc.RpcMethodHandler:
            return grpc.stream_stream_rpc_method_handler(
                self._method(_DeltaStream, fixed),
                request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
                response_serializer=_serialize,
            )

        handlers = [
            grpc.method_handlers_generic_handler(
                ADS_SERVICE,
                {"StreamAggregatedResources": sotw(None), "DeltaAggregatedResources": delta(None)},
            )
        ]
        for service, sotw_name, delta_name, url in SINGLE_TYPE_SERVICES:
            handlers.append(
                grpc.method_handlers_generic_handler(
                    service, {sotw_name: sotw(url), delta_name: delta(url)}
                )
            )
        return tuple(handlers)

    def _method(
        self, cls: type[_Stream], fixed: str | None
    ) -> Callable[[AsyncIterator[Any], grpc.aio.ServicerContext], Any]:
        async def handler(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
            self._active += 1
            self._streams_total += 1
            try:
                await cls(self, requests, context, fixed).run()
            finally:
                self._active -= 1

        return handler
