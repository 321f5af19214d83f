"""``AdsClient`` handlers for ambient workload discovery: ``AddressHandler``
(``istio.workload.Address``: workloads and services under one type URL) and
``AuthorizationHandler`` (``istio.security.Authorization``). Both are wildcard
subscriptions (``wildcard = True``: the client sends ``"*"``), validate by converting to
the frozen model (a bad resource is NACKed with the field path) and apply into a
``MeshState``. ``on_change`` (optional) runs after every applied change, e.g. to evict
certificates of workloads that left the node.
Neighbours: ``dataplane.xds`` (client, BaseHandler), ``model``, ``stores``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from google.protobuf.message import Message

from isthmus._proto.workload.v1 import authorization_pb2, workload_pb2
from isthmus.dataplane.state.model import (
    ADDRESS_TYPE_URL,
    AUTHORIZATION_TYPE_URL,
    Service,
    Workload,
    address_from_proto,
    address_resource_name,
)
from isthmus.dataplane.state.policy import Authorization
from isthmus.dataplane.state.stores import MeshState
from isthmus.dataplane.xds.errors import ConfigRejected
from isthmus.dataplane.xds.handlers import BaseHandler, Changes


class AddressHandler(BaseHandler):
    type_url = ADDRESS_TYPE_URL
    message_type = workload_pb2.Address
    wildcard = True

    def __init__(self, state: MeshState, on_change: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.mesh = state
        self.on_change = on_change
        self._kinds: dict[str, str] = {}  # resource name -> "workload" | "service"

    def resource_name(self, message: Message) -> str:
        return address_resource_name(message)

    def validate(self, name: str, message: Message) -> None:
        if not name:
            raise ConfigRejected(name, "type", "an Address needs a workload or a service")
        try:
            address_from_proto(message)
        except ValueError as exc:
            path, _, reason = str(exc).partition(": ")
            raise ConfigRejected(name, path, reason or str(exc)) from None

    def apply(self, changes: Changes) -> None:
        st = self.mesh
        for name in changes.removed:
            kind = self._kinds.pop(name, None)
            if kind == "service":
                st.services.remove(name)
            else:
                st.workloads.remove(name)
        for name, res in changes.updated.items():
            value = address_from_proto(res.message)
            old = self._kinds.get(name)
            if isinstance(value, Workload):
                if old == "service":
                    st.services.remove(name)
                st.workloads.upsert(name, value)
                self._kinds[name] = "workload"
            else:
                assert isinstance(value, Service)
                if old == "workload":
                    st.workloads.remove(name)
                st.services.upsert(name, value)
                self._kinds[name] = "service"
        super().apply(changes)
        if self.on_change is not None:
            self.on_change()


class AuthorizationHandler(BaseHandler):
    type_url = AUTHORIZATION_TYPE_URL
    message_type = authorization_pb2.Authorization
    wildcard = True

    def __init__(self, state: MeshState, on_change: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.mesh = state
        self.on_change = on_change

    def resource_name(self, message: Any) -> str:
        return f"{message.namespace}/{message.name}" if message.name else ""

    def validate(self, name: str, message: Message) -> None:
        if not name:
            raise ConfigRejected(name, "name", "an Authorization needs a name")
        try:
            Authorization.from_proto(message)
        except ValueError as exc:
            path, _, reason = str(exc).partition(": ")
            raise ConfigRejected(name, path, reason or str(exc)) from None

    def apply(self, changes: Changes) -> None:
        for name in changes.removed:
            self.mesh.policies.remove(name)
        for name, res in changes.updated.items():
            self.mesh.policies.upsert(name, Authorization.from_proto(res.message))
        super().apply(changes)
        if self.on_change is not None:
            self.on_change()


def workload_handlers(state: MeshState, on_change: Callable[[], None] | None = None
                      ) -> list[BaseHandler]:
    return [AddressHandler(state, on_change), AuthorizationHandler(state, on_change)]
