"""The agent end to end on loopback: a real TLS CA, the agent fetching and rotating a
short-lived certificate, real gRPC SDS streams (SotW and delta) over the unix socket
receiving new versions on the same stream, the certs directory switching atomically,
CA outages, and a root rotation with delayed signing seen through the agent."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time
from pathlib import Path

import grpc
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc

from isthmus.controlplane.ca import pki
from isthmus.controlplane.ca.authn import StaticTokenAuthenticator
from isthmus.controlplane.ca.authority import CertificateAuthority, utcnow
from isthmus.dataplane.agent.agent import Agent, AgentOptions
from isthmus.dataplane.agent.sds import SECRET_TYPE_URL

from .fixtures import bundle_pem, ca_server, short_tmp

TIMEOUT = 10.0


async def wait_until(predicate, timeout: float = TIMEOUT) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


class SotwClient:
    """A real SDS StreamSecrets client that ACKs what it gets."""

    def __init__(self, channel: grpc.aio.Channel, names: list[str]) -> None:
        self.names = names
        self.queue: asyncio.Queue[discovery_pb2.DiscoveryRequest | None] = asyncio.Queue()
        self.queue.put_nowait(discovery_pb2.DiscoveryRequest(resource_names=names, type_url=SECRET_TYPE_URL))
        self.call = sds_pb2_grpc.SecretDiscoveryServiceStub(channel).StreamSecrets(self._requests())

    async def _requests(self):  # type: ignore[no-untyped-def]
        while (req := await self.queue.get()) is not None:
            yield req

    async def next(self, timeout: float = TIMEOUT) -> discovery_pb2.DiscoveryResponse:
        resp = await asyncio.wait_for(self.call.read(), timeout)
        assert resp is not grpc.aio.EOF
        self.queue.put_nowait(discovery_pb2.DiscoveryRequest(
            resource_names=self.names, type_url=SECRET_TYPE_URL, version_info=resp.version_info,
            response_nonce=resp.nonce))
        return resp

    def close(self) -> None:
        self.queue.put_nowait(None)
        self.call.cancel()


def secrets_of(resp) -> dict[str, secret_pb2.Secret]:  # type: ignore[no-untyped-def]
    out = {}
    for any_ in resp.resources:
        s = secret_pb2.Secret()
        any_.Unpack(s)
        out[s.name] = s
    return out


def leaf_of(secret: secret_pb2.Secret):  # type: ignore[no-untyped-def]
    return pki.load_certs_pem(secret.tls_certificate.certificate_chain.inline_bytes)[0]


def setup(d: Path, ttl: int, ca: CertificateAuthority, port: int, **kw: object) -> tuple[Agent, StaticTokenAuthenticator]:
    auth = StaticTokenAuthenticator()
    (d / "token").write_text(auth.issue("default", "bookinfo"))
    (d / "root-cert.pem").write_bytes(bundle_pem(ca))
    options = AgentOptions(
        ca_address=f"127.0.0.1:{port}", namespace="default", service_account="bookinfo",
        token_file=d / "token", ca_root_cert=d / "root-cert.pem", sds_socket=d / "sds.sock",
        certs_dir=d / "certs", ttl_seconds=ttl, **kw,  # type: ignore[arg-type]
    )
    return Agent(options), auth


class AtomicReader(threading.Thread):
    """Reads the certs dir in a loop while the agent rewrites it: every read of the
    visible files parses, and the pair behind one ``..data`` resolution always matches."""

    def __init__(self, certs: Path) -> None:
        super().__init__(daemon=True)
        self.certs = certs / "default"
        self.stop = threading.Event()
        self.pairs = 0
        self.serials: set[int] = set()
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                chain = pki.load_certs_pem((self.certs / "cert-chain.pem").read_bytes())
                assert chain, "empty cert-chain.pem"
                data = self.certs / (self.certs / "..data").readlink()
                leaf = pki.load_certs_pem((data / "cert-chain.pem").read_bytes())[0]
                key = pki.load_key_pem((data / "key.pem").read_bytes())
            except FileNotFoundError:
                time.sleep(0.001)  # not written yet, or an old generation just removed
                continue
            except Exception as exc:  # noqa: BLE001 - a partial or mismatched read
                self.errors.append(repr(exc))
                continue
            if not pki.same_public_key(leaf.public_key(), key.public_key()):
                self.errors.append("key does not match certificate")
            self.pairs += 1
            self.serials.add(leaf.serial_number)
            time.sleep(0.002)


async def test_rotation_at_half_life_pushes_on_the_same_sds_streams():
    ca = CertificateAuthority.self_signed()
    with short_tmp() as d:
        async with ca_server(ca, StaticTokenAuthenticator()) as server:
            agent, auth = setup(d, 4, ca, server.port)
            server.service.authenticator = auth
            reader = AtomicReader(d / "certs")
            reader.start()
            await agent.start()
            try:
                async with grpc.aio.insecure_channel(f"unix:{d / 'sds.sock'}") as ch:
                    sotw = SotwClient(ch, ["default"])
                    root_stream = SotwClient(ch, ["ROOTCA"])
                    first = await sotw.next()
                    t1 = time.monotonic()
                    assert first.version_info == "1"
                    leaf1 = leaf_of(secrets_of(first)["default"])
                    assert pki.spiffe_ids(leaf1) == ["spiffe://cluster.local/ns/default/sa/bookinfo"]
                    roots = await root_stream.next()
                    assert secrets_of(roots)["ROOTCA"].validation_context.trusted_ca.inline_bytes == bundle_pem(ca)
                    lifetime = (leaf1.not_valid_after_utc - agent.store.current.received_at).total_seconds()
                    assert 3.5 < lifetime <= 5.0

                    second = await sotw.next()
                    elapsed = time.monotonic() - t1
                    assert second.version_info == "2"
                    leaf2 = leaf_of(secrets_of(second)["default"])
                    assert leaf2.serial_number != leaf1.serial_number
                    assert 0.4 * lifetime <= elapsed <= 0.6 * lifetime + 0.3, (elapsed, lifetime)
                    # new key too, and the chain verifies
                    assert not pki.same_public_key(leaf1.public_key(), leaf2.public_key())
                    pki.verify_chain(leaf2, [], ca.trust_bundle(), now=utcnow(),
                                     expected_id="spiffe://cluster.local/ns/default/sa/bookinfo")
                    # same stream object, no reconnect; the ROOTCA stream got nothing new
                    assert sotw.call.done() is False
                    assert agent.sds.streams == 2
                    await asyncio.sleep(0.2)
                    assert root_stream.queue.qsize() == 0 and agent.sds.responses == 3
                    sotw.close()
                    root_stream.close()
            finally:
                await agent.stop()
                reader.stop.set()
                reader.join(2)
            assert reader.errors == []
            assert reader.pairs > 10 and leaf2.serial_number in reader.serials
            assert sorted(p.name for p in (d / "certs" / "default").iterdir() if not p.name.startswith("..")) == [
                "cert-chain.pem", "key.pem", "root-cert.pem"]


async def test_delta_sds_stream_and_unknown_names():
    ca = CertificateAuthority.self_signed()
    with short_tmp() as d:
        async with ca_server(ca, StaticTokenAuthenticator()) as server:
            agent, auth = setup(d, 3, ca, server.port)
            server.service.authenticator = auth
            async with grpc.aio.insecure_channel(f"unix:{d / 'sds.sock'}") as ch:
                await agent.start()  # the stream opens before the first certificate exists
                try:
                    stub = sds_pb2_grpc.SecretDiscoveryServiceStub(ch)
                    q: asyncio.Queue = asyncio.Queue()
                    q.put_nowait(discovery_pb2.DeltaDiscoveryRequest(
                        type_url=SECRET_TYPE_URL, resource_names_subscribe=["default", "ROOTCA", "file-cert:x"]))

                    async def reqs():  # type: ignore[no-untyped-def]
                        while (r := await q.get()) is not None:
                            yield r

                    call = stub.DeltaSecrets(reqs())
                    r1 = await asyncio.wait_for(call.read(), TIMEOUT)
                    assert sorted(r.name for r in r1.resources) == ["ROOTCA", "default"]
                    assert list(r1.removed_resources) == ["file-cert:x"]
                    versions = {r.name: r.version for r in r1.resources}
                    q.put_nowait(discovery_pb2.DeltaDiscoveryRequest(type_url=SECRET_TYPE_URL, response_nonce=r1.nonce))
                    r2 = await asyncio.wait_for(call.read(), TIMEOUT)  # rotation: only `default` changed
                    assert [r.name for r in r2.resources] == ["default"]
                    assert r2.resources[0].version != versions["default"] and not r2.removed_resources
                    q.put_nowait(None)
                    call.cancel()

                    # a reconnecting client that already has the current versions gets nothing
                    current = {r.name: r.version for r in r2.resources} | {"ROOTCA": versions["ROOTCA"]}
                    q2: asyncio.Queue = asyncio.Queue()
                    q2.put_nowait(discovery_pb2.DeltaDiscoveryRequest(
                        type_url=SECRET_TYPE_URL, resource_names_subscribe=["default", "ROOTCA"],
                        initial_resource_versions=current))

                    async def reqs2():  # type: ignore[no-untyped-def]
                        while (r := await q2.get()) is not None:
                            yield r

                    call2 = stub.DeltaSecrets(reqs2())
                    r3 = await asyncio.wait_for(call2.read(), TIMEOUT)  # only the next rotation arrives
                    assert [r.name for r in r3.resources] == ["default"]
                    assert r3.resources[0].version != current["default"]
                    q2.put_nowait(None)
                    call2.cancel()
                finally:
                    await agent.stop()


async def test_ca_outage_keeps_the_old_certificate_and_recovers():
    ca = CertificateAuthority.self_signed()
    auth = StaticTokenAuthenticator()
    with short_tmp() as d:
        async with ca_server(ca, auth) as server:
            port = server.port
        # CA down at start: the agent retries with backoff
        agent, token_auth = setup(d, 3, ca, port, backoff_initial=0.1, backoff_max=0.3)
        await agent.start()
        try:
            await wait_until(lambda: agent.rotator.failures >= 2)
            assert agent.store.current is None
            assert "UNAVAILABLE" in agent.rotator.last_error
            async with ca_server(ca, token_auth, port=port):
                first = await agent.wait_ready(TIMEOUT)
            # CA gone again: renewal fails, the old certificate stays published
            failures = agent.rotator.failures
            await wait_until(lambda: agent.rotator.failures > failures)  # only after the renewal time
            assert agent.rotator.next_renewal is not None and utcnow() >= agent.rotator.next_renewal
            assert agent.store.current is first and agent.store.version == 1
            async with ca_server(ca, token_auth, port=port):
                await asyncio.wait_for(agent.store.wait_newer(1), TIMEOUT)
            assert agent.store.current.serial != first.serial
        finally:
            await agent.stop()


async def test_root_rotation_with_signing_delay_reaches_the_agent():
    ca = CertificateAuthority.self_signed()
    old_root = ca.trust_bundle()[0]
    with short_tmp() as d:
        async with ca_server(ca, StaticTokenAuthenticator()) as server:
            agent, auth = setup(d, 4, ca, server.port, jitter=0.0)
            server.service.authenticator = auth
            await agent.start()
            try:
                await agent.wait_ready(TIMEOUT)

                new_root = ca.rotate_root(signing_delay=dt.timedelta(seconds=3), overlap=dt.timedelta(hours=1))
                # renewal 1 (~2 s): still signed by the old root, bundle now has both
                await asyncio.wait_for(agent.store.wait_newer(1), TIMEOUT)
                c2 = agent.store.current
                assert pki.load_certs_pem(c2.roots_pem) == [old_root, new_root]
                assert pki.issued_by(pki.load_certs_pem(c2.cert_chain_pem)[0], old_root)
                # renewal 2 (after the switch): the CA's TLS cert and the leaf come from the new
                # root, which the agent learnt from the previous bundle (its root file is old-only)
                await asyncio.wait_for(agent.store.wait_newer(2), TIMEOUT)
                c3 = agent.store.current
                leaf3 = pki.load_certs_pem(c3.cert_chain_pem)[0]
                assert pki.issued_by(leaf3, new_root)
                assert pki.load_certs_pem(c3.roots_pem) == [new_root, old_root]
                assert (d / "certs" / "ROOTCA" / "root-cert.pem").read_bytes() == c3.roots_pem
                # the old-root certificate still verifies against the new bundle (overlap)
                leaf2 = pki.load_certs_pem(c2.cert_chain_pem)[0]
                pki.verify_chain(leaf2, [], pki.load_certs_pem(c3.roots_pem), now=utcnow())
            finally:
                await agent.stop()
