"""JwtAuthnFilter: Envoy's ``envoy.filters.http.jwt_authn`` (JwtAuthentication) with
``cryptography``, plus what Istio's ``istio_authn`` filter derives from it.

Compiled once (``from_proto``): providers (issuer, audiences, token locations —
``from_headers`` with ``value_prefix``, ``from_params``, ``from_cookies``; default
``Authorization: Bearer`` and ``?access_token=`` —, ``forward``,
``forward_payload_header``, ``payload_in_metadata``, ``claim_to_headers``,
``clock_skew_seconds`` (default 60), ``require_expiration``, JWKS inline (JSON or PEM)
or remote (``http_uri`` through its cluster, ``cache_duration``, default 5 min)), rules
(first matching ``RouteMatch`` → requirement; ``requirement_name`` via
``requirement_map``) and the requirement tree (``provider_name``,
``provider_and_audiences``, ``requires_any``, ``requires_all``, ``allow_missing``,
``allow_missing_or_failed``).

Per request: the token is taken from the provider's locations (bounded to
``MAX_TOKEN_BYTES``; a garbage token is a failed token, never an exception), parsed,
checked (issuer, audiences, exp/nbf with the clock skew) and its signature verified
(RS256/384/512, PS256/384/512, ES256/384/512, EdDSA, HS256/384/512 against the JWKS
keys of matching kid and type). Successful tokens are cached (bounded) until they
expire. A failed requirement answers 401 (403 for audiences, as Envoy) with
``www-authenticate: Bearer realm="http://<host><path>", error="invalid_token"`` and
details ``jwt_authn_access_denied{<reason>}``; a missing token continues when the
requirement allows it (Istio: then authorization decides). On success: header
stripped unless ``forward``, claims to headers, the payload in dynamic metadata
``envoy.filters.http.jwt_authn[<payload_in_metadata>]`` and Istio's ``istio_authn``
(``request.auth.principal`` = ``iss/sub``, ``request.auth.audiences``,
``request.auth.presenter``, ``request.auth.claims`` = {claim: [values]}) for RBAC.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from isthmus.dataplane.envoy._proto import Ctx, duration_s, join
from isthmus.dataplane.envoy.matchers import HeaderMatcher, compile_pattern, header_value
from isthmus.dataplane.http.filters import (
    DYN_ISTIO_AUTHN,
    DYN_JWT,
    first,
    set_metadata,
)

log = logging.getLogger("isthmus.jwt_authn")

MAX_TOKEN_BYTES = 8192
MAX_JWKS_BYTES = 256 * 1024
MAX_JWKS_KEYS = 64
DEFAULT_CLOCK_SKEW_S = 60
DEFAULT_CACHE_DURATION_S = 300.0
DEFAULT_FETCH_TIMEOUT_S = 1.0
FETCH_FAILURE_RETRY_S = 1.0
VERIFIED_CACHE_SIZE = 512

# jwt_verify_lib status texts (Envoy's response bodies)
OK = "OK"
MISSING = "Jwt is missing"
EXPIRED = "Jwt is expired"
NOT_YET_VALID = "Jwt not yet valid"
BAD_FORMAT = "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"
BAD_HEADER = "Jwt header is an invalid JSON"
BAD_PAYLOAD = "Jwt payload is an invalid JSON"
BAD_BASE64 = "Jwt is an invalid Base64url encoded"
BAD_ALG = "Jwt header [alg] is not supported"
NO_EXP = "Jwt payload [exp] field is required"
VERIFICATION_FAIL = "Jwt verification fails"
UNKNOWN_ISSUER = "Jwt issuer is not configured"
AUDIENCE = "Audiences in Jwt are not allowed"
FETCH_FAIL = "Jwks remote fetch is failed"
KID_ALG = "Jwks doesn't have key to match kid or alg from Jwt"
TOO_LARGE = "Jwt size exceeds the limit"

_HASHES: dict[str, Any] = {"256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}
_CURVES = {"P-256": (ec.SECP256R1, "256", 32), "P-384": (ec.SECP384R1, "384", 48),
           "P-521": (ec.SECP521R1, "512", 66)}
_ALGS = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512",
         "EdDSA", "HS256", "HS384", "HS512"}


def b64url_decode(s: str) -> bytes:
    if not s or len(s) > MAX_JWKS_BYTES:
        raise ValueError("empty or oversized base64url")
    s = s.strip()
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def _b64_int(s: str) -> int:
    return int.from_bytes(b64url_decode(s), "big")


# --------------------------------------------------------------------------- keys


@dataclass(frozen=True, slots=True)
class Jwk:
    kty: str  # RSA | EC | OKP | oct | PEM
    kid: str
    alg: str
    key: Any  # public key object, or bytes for oct
    crv: str = ""


def _jwk(d: dict[str, Any]) -> Jwk | None:
    kty = d.get("kty")
    kid = str(d.get("kid") or "")
    alg = str(d.get("alg") or "")
    try:
        if kty == "RSA":
            return Jwk("RSA", kid, alg, rsa.RSAPublicNumbers(_b64_int(d["e"]),
                                                             _b64_int(d["n"])).public_key())
        if kty == "EC":
            crv = d.get("crv", "")
            spec = _CURVES.get(crv)
            if spec is None:
                return None
            return Jwk("EC", kid, alg, ec.EllipticCurvePublicNumbers(
                _b64_int(d["x"]), _b64_int(d["y"]), spec[0]()).public_key(), crv)
        if kty == "OKP" and d.get("crv") == "Ed25519":
            return Jwk("OKP", kid, alg, ed25519.Ed25519PublicKey.from_public_bytes(
                b64url_decode(d["x"])), "Ed25519")
        if kty == "oct":
            return Jwk("oct", kid, alg, b64url_decode(d["k"]))
    except (KeyError, ValueError, TypeError, binascii.Error):
        return None
    return None


def parse_jwks(text: str | bytes) -> tuple[Jwk, ...]:
    """JWKS JSON (``{"keys": [...]}`` or one JWK) or a PEM public key -> keys. Invalid
    input yields no keys (tokens then fail with ``KID_ALG``), never an exception."""
    if isinstance(text, bytes):
        if len(text) > MAX_JWKS_BYTES:
            return ()
        text = text.decode("utf-8", "replace")
    if len(text) > MAX_JWKS_BYTES:
        return ()
    s = text.strip()
    if s.startswith("-----BEGIN"):
        try:
            k = serialization.load_pem_public_key(s.encode())
        except (ValueError, TypeError):
            return ()
        if isinstance(k, rsa.RSAPublicKey):
            return (Jwk("RSA", "", "", k),)
        if isinstance(k, ec.EllipticCurvePublicKey):
            crv = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}.get(
                k.curve.name, "")
            return (Jwk("EC", "", "", k, crv),)
        if isinstance(k, ed25519.Ed25519PublicKey):
            return (Jwk("OKP", "", "", k, "Ed25519"),)
        return ()
    try:
        doc = json.loads(s)
    except (ValueError, RecursionError):
        return ()
    items = doc.get("keys") if isinstance(doc, dict) and "keys" in doc else [doc]
    if not isinstance(items, list):
        return ()
    out: list[Jwk] = []
    for d in items[:MAX_JWKS_KEYS]:
        if isinstance(d, dict):
            jk = _jwk(d)
            if jk is not None:
                out.append(jk)
    return tuple(out)


def _verify_with(k: Jwk, alg: str, signing_input: bytes, sig: bytes) -> bool:
    fam, bits = alg[:2], alg[2:]
    try:
        if fam in ("RS", "PS"):
            if k.kty != "RSA":
                return False
            h = _HASHES[bits]()
            pad: Any = padding.PKCS1v15() if fam == "RS" else padding.PSS(
                mgf=padding.MGF1(h), salt_length=h.digest_size)
            k.key.verify(sig, signing_input, pad, h)
            return True
        if fam == "ES":
            spec = _CURVES.get(k.crv)
            if k.kty != "EC" or spec is None or spec[1] != bits:
                return False
            n = spec[2]
            if len(sig) != 2 * n:
                return False
            der = encode_dss_signature(int.from_bytes(sig[:n], "big"),
                                       int.from_bytes(sig[n:], "big"))
            k.key.verify(der, signing_input, ec.ECDSA(_HASHES[bits]()))
            return True
        if alg == "EdDSA":
            if k.kty != "OKP":
                return False
            k.key.verify(sig, signing_input)
            return True
        if fam == "HS":
            if k.kty != "oct":
                return False
            mac = hmac.new(k.key, signing_input, getattr(hashlib, "sha" + bits)).digest()
            return hmac.compare_digest(mac, sig)
    except (InvalidSignature, ValueError, TypeError, KeyError):
        return False
    return False


# --------------------------------------------------------------------------- tokens


@dataclass(frozen=True, slots=True)
class Jwt:
    header: dict[str, Any]
    payload: dict[str, Any]
    signing_input: bytes
    signature: bytes
    payload_b64: str

    @property
    def alg(self) -> str:
        return str(self.header.get("alg") or "")

    @property
    def kid(self) -> str:
        return str(self.header.get("kid") or "")

    @property
    def iss(self) -> str:
        v = self.payload.get("iss")
        return v if isinstance(v, str) else ""

    @property
    def sub(self) -> str:
        v = self.payload.get("sub")
        return v if isinstance(v, str) else ""

    @property
    def audiences(self) -> tuple[str, ...]:
        aud = self.payload.get("aud")
        if isinstance(aud, str):
            return (aud,)
        if isinstance(aud, list):
            return tuple(a for a in aud if isinstance(a, str))
        return ()


def parse_jwt(token: str) -> Jwt | str:
    """A parsed token, or the failure status text."""
    if len(token) > MAX_TOKEN_BYTES:
        return TOO_LARGE
    parts = token.split(".")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        return BAD_FORMAT
    try:
        hb = b64url_decode(parts[0])
        pb = b64url_decode(parts[1])
        sig = b64url_decode(parts[2]) if parts[2] else b""
    except (ValueError, binascii.Error):
        return BAD_BASE64
    try:
        header = json.loads(hb)
    except (ValueError, RecursionError):
        return BAD_HEADER
    try:
        payload = json.loads(pb)
    except (ValueError, RecursionError):
        return BAD_PAYLOAD
    if not isinstance(header, dict):
        return BAD_HEADER
    if not isinstance(payload, dict):
        return BAD_PAYLOAD
    if header.get("alg") not in _ALGS:
        return BAD_ALG
    return Jwt(header, payload, f"{parts[0]}.{parts[1]}".encode("ascii", "replace"), sig,
               parts[1])


# --------------------------------------------------------------------------- JWKS


class JwksSource:
    """Keys of one provider: inline (fixed) or remote (fetched, cached, refreshed)."""

    def __init__(self, keys: tuple[Jwk, ...] = (), uri: str = "", cluster: str = "",
                 timeout_s: float = DEFAULT_FETCH_TIMEOUT_S,
                 cache_s: float = DEFAULT_CACHE_DURATION_S) -> None:
        self.keys = keys
        self.remote = bool(uri)
        self.uri = uri
        self.cluster = cluster
        self.timeout_s = timeout_s
        self.cache_s = cache_s
        self.expires = 0.0
        self.failed_until = 0.0
        self._inflight: asyncio.Future[None] | None = None
        self.last_error = ""
        #: tokens whose signature verified against these keys (claims are re-checked on
        #: every use); cleared when the keys change
        self.verified: dict[str, Jwt] = {}

    async def get(self, core: Any) -> tuple[Jwk, ...] | None:
        """The keys; None when a remote fetch failed (and no cached keys remain)."""
        if not self.remote:
            return self.keys
        now = time.monotonic()
        if self.keys and now < self.expires:
            return self.keys
        if now < self.failed_until and not self.keys:
            return None
        fut = self._inflight
        if fut is None:
            fut = self._inflight = asyncio.get_running_loop().create_future()
            try:
                await self._fetch(core)
            finally:
                self._inflight = None
                if not fut.done():
                    fut.set_result(None)
        else:
            await asyncio.shield(fut)
        return self.keys or None

    async def _fetch(self, core: Any) -> None:
        from isthmus.dataplane.http.filters._client import CallError, http_call

        u = urlsplit(self.uri)
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        try:
            r = await http_call(core, self.cluster, self.uri, "GET", path,
                                [(b"accept", b"application/json")], b"", self.timeout_s,
                                MAX_JWKS_BYTES)
            if r.status != 200:
                raise CallError(f"status {r.status}")
            keys = parse_jwks(r.body)
            if not keys:
                raise CallError("the response has no usable key")
        except CallError as exc:
            self.last_error = str(exc)
            self.failed_until = time.monotonic() + FETCH_FAILURE_RETRY_S
            log.warning("jwt_authn: fetching JWKS from %s (cluster %s) failed: %s", self.uri,
                        self.cluster or "-", exc)
            if self.keys and time.monotonic() > self.expires + self.cache_s:
                self.keys = ()  # too stale to keep using
            return
        if keys != self.keys:
            self.verified = {}
        self.keys = keys
        self.expires = time.monotonic() + self.cache_s
        self.last_error = ""


# module-level so an LDS update (a recompiled filter) keeps fetched keys
_REMOTE_JWKS: dict[tuple[str, str], JwksSource] = {}


# --------------------------------------------------------------------------- config


@dataclass(frozen=True, slots=True)
class Location:
    kind: str  # header | param | cookie
    name: str
    prefix: str = ""


@dataclass(frozen=True, slots=True)
class Provider:
    name: str
    issuer: str
    audiences: frozenset[str]
    jwks: JwksSource = field(compare=False)
    locations: tuple[Location, ...]
    forward: bool = False
    forward_payload_header: str = ""
    pad_forward_payload_header: bool = False
    payload_in_metadata: str = ""
    claim_to_headers: tuple[tuple[str, str], ...] = ()
    clock_skew_s: int = DEFAULT_CLOCK_SKEW_S
    require_expiration: bool = False
    max_lifetime_s: float = 0.0


_DEFAULT_LOCATIONS = (Location("header", "authorization", "Bearer "),
                      Location("param", "access_token"))

# requirement nodes: ("p", provider, audiences|None) ("any", kids) ("all", kids)
# ("missing",) ("missing_or_failed",)
Req = tuple[Any, ...]


def _requirement(ctx: Ctx, r: Any, providers: dict[str, Provider], path: str) -> Req:
    which = r.WhichOneof("requires_type")
    if which == "provider_name":
        if r.provider_name not in providers:
            ctx.reject(join(path, "provider_name"), f"unknown provider {r.provider_name!r}")
        return ("p", providers[r.provider_name], None)
    if which == "provider_and_audiences":
        pa = r.provider_and_audiences
        if pa.provider_name not in providers:
            ctx.reject(join(path, "provider_and_audiences.provider_name"),
                       f"unknown provider {pa.provider_name!r}")
        return ("p", providers[pa.provider_name], frozenset(pa.audiences))
    if which in ("requires_any", "requires_all"):
        lst = getattr(r, which).requirements
        kids = tuple(_requirement(ctx, x, providers, f"{join(path, which)}.requirements[{i}]")
                     for i, x in enumerate(lst))
        if not kids:
            ctx.reject(join(path, which), "needs requirements")
        return ("any" if which == "requires_any" else "all", kids)
    if which == "allow_missing":
        return ("missing",)
    if which == "allow_missing_or_failed":
        return ("missing_or_failed",)
    ctx.reject(path, "a JwtRequirement needs one of its requirement fields")


@dataclass(frozen=True, slots=True)
class Rule:
    kind: str  # prefix | path | regex | sep_prefix
    value: str
    regex: Any
    case_sensitive: bool
    headers: tuple[HeaderMatcher, ...]
    requires: Req | None

    def matches(self, path: str, hdict: dict[str, Any]) -> bool:
        p = path.split("?", 1)[0]
        if not self.case_sensitive:
            p = p.lower()
        k = self.kind
        if k == "prefix":
            ok = p.startswith(self.value)
        elif k == "path":
            ok = p == self.value
        elif k == "sep_prefix":
            ok = p == self.value or p.startswith(self.value + "/")
        else:
            ok = self.regex.fullmatch(p) is not None
        if not ok:
            return False
        return all(h.matches_value(header_value(hdict, h.name)) for h in self.headers)


def _rule(ctx: Ctx, r: Any, providers: dict[str, Provider], reqmap: dict[str, Req],
          path: str) -> Rule:
    ctx.only(r, {"match", "requires", "requirement_name"}, path)
    m = r.match
    mp = join(path, "match")
    ctx.only(m, {"prefix", "path", "safe_regex", "path_separated_prefix", "case_sensitive",
                 "headers"}, mp)
    which = m.WhichOneof("path_specifier")
    cs = m.case_sensitive.value if m.HasField("case_sensitive") else True
    regex = None
    if which == "safe_regex":
        regex = compile_pattern(ctx, m.safe_regex.regex, join(mp, "safe_regex.regex"))
        kind, value = "regex", ""
    elif which in ("prefix", "path", "path_separated_prefix"):
        kind = {"prefix": "prefix", "path": "path", "path_separated_prefix": "sep_prefix"}[which]
        value = getattr(m, which)
        if not cs:
            value = value.lower()
    else:
        ctx.reject(mp, "only prefix, path, path_separated_prefix and safe_regex matches "
                       "are supported")
    headers = tuple(HeaderMatcher.from_proto(ctx, h, f"{join(mp, 'headers')}[{i}]")
                    for i, h in enumerate(m.headers))
    requires: Req | None = None
    if r.HasField("requires"):
        requires = _requirement(ctx, r.requires, providers, join(path, "requires"))
    elif r.requirement_name:
        if r.requirement_name not in reqmap:
            ctx.reject(join(path, "requirement_name"),
                       f"{r.requirement_name!r} is not in requirement_map")
        requires = reqmap[r.requirement_name]
    return Rule(kind, value, regex, cs, headers, requires)


_PROVIDER_FIELDS = {
    "issuer", "audiences", "remote_jwks", "local_jwks", "forward", "from_headers",
    "from_params", "from_cookies", "forward_payload_header", "pad_forward_payload_header",
    "payload_in_metadata", "clock_skew_seconds", "claim_to_headers", "require_expiration",
    "max_lifetime", "jwt_cache_config", "clear_route_cache",
}


def _provider(ctx: Ctx, name: str, p: Any, path: str) -> Provider:
    ctx.only(p, _PROVIDER_FIELDS, path)
    which = p.WhichOneof("jwks_source_specifier")
    if which == "local_jwks":
        ds = p.local_jwks
        spec = ds.WhichOneof("specifier")
        if spec == "inline_string":
            keys = parse_jwks(ds.inline_string)
        elif spec == "inline_bytes":
            keys = parse_jwks(bytes(ds.inline_bytes))
        elif spec == "filename":
            try:
                with open(ds.filename, "rb") as f:
                    keys = parse_jwks(f.read(MAX_JWKS_BYTES + 1))
            except OSError as exc:
                ctx.reject(join(path, "local_jwks.filename"), f"cannot read: {exc}")
        else:
            ctx.reject(join(path, "local_jwks"), "needs inline_string, inline_bytes or filename")
        if not keys:
            log.warning("jwt_authn provider %s: local_jwks has no usable key (every token "
                        "will fail)", name)
        jwks = JwksSource(keys)
    elif which == "remote_jwks":
        rj = p.remote_jwks
        hu = rj.http_uri
        if not hu.uri:
            ctx.reject(join(path, "remote_jwks.http_uri.uri"), "must not be empty")
        timeout = duration_s(hu.timeout) if hu.HasField("timeout") else DEFAULT_FETCH_TIMEOUT_S
        cache = duration_s(rj.cache_duration) if rj.HasField("cache_duration") \
            else DEFAULT_CACHE_DURATION_S
        key = (hu.uri, hu.cluster)
        src = _REMOTE_JWKS.get(key)
        if src is None or src.timeout_s != timeout or src.cache_s != cache:
            src = JwksSource(uri=hu.uri, cluster=hu.cluster, timeout_s=timeout or
                             DEFAULT_FETCH_TIMEOUT_S, cache_s=cache or DEFAULT_CACHE_DURATION_S)
            if len(_REMOTE_JWKS) > 256:
                _REMOTE_JWKS.clear()
            _REMOTE_JWKS[key] = src
        jwks = src
    else:
        ctx.reject(path, "a provider needs local_jwks or remote_jwks")
    locs: list[Location] = []
    for h in p.from_headers:
        locs.append(Location("header", h.name.lower(), h.value_prefix))
    for q in p.from_params:
        locs.append(Location("param", q))
    for c in p.from_cookies:
        locs.append(Location("cookie", c))
    skew = p.clock_skew_seconds if p.clock_skew_seconds else DEFAULT_CLOCK_SKEW_S
    return Provider(
        name=name, issuer=p.issuer, audiences=frozenset(p.audiences), jwks=jwks,
        locations=tuple(locs) or _DEFAULT_LOCATIONS, forward=p.forward,
        forward_payload_header=p.forward_payload_header.lower(),
        pad_forward_payload_header=p.pad_forward_payload_header,
        payload_in_metadata=p.payload_in_metadata,
        claim_to_headers=tuple((c.header_name.lower(), c.claim_name)
                               for c in p.claim_to_headers),
        clock_skew_s=skew, require_expiration=p.require_expiration,
        max_lifetime_s=duration_s(p.max_lifetime) if p.HasField("max_lifetime") else 0.0,
    )


# --------------------------------------------------------------------------- verify


@dataclass(slots=True)
class _Found:
    provider: Provider
    location: Location
    token: str
    jwt: Jwt | None = None


class _Verification:
    """Per request: tokens found and results per provider (each verified once)."""

    __slots__ = ("_cookies", "_query", "core", "hdict", "ok", "path", "results")

    def __init__(self, core: Any, hdict: dict[str, Any], path: str) -> None:
        self.core = core
        self.hdict = hdict
        self.path = path
        self.results: dict[str, str] = {}
        self.ok: dict[str, _Found] = {}
        self._query: dict[str, str] | None = None
        self._cookies: dict[str, str] | None = None

    def extract(self, p: Provider) -> _Found | None:
        for loc in p.locations:
            v = self._value(loc)
            if v is None:
                continue
            if loc.prefix:
                if not v.startswith(loc.prefix):
                    continue
                v = v[len(loc.prefix):]
            v = v.strip()
            if v:
                return _Found(p, loc, v)
        return None

    def _value(self, loc: Location) -> str | None:
        if loc.kind == "header":
            v = self.hdict.get(loc.name)
            return first(v) if v is not None else None
        if loc.kind == "param":
            if self._query is None:
                q = self.path.partition("?")[2]
                self._query = dict(parse_qsl(q.partition("#")[0], keep_blank_values=True,
                                             max_num_fields=100)) if q else {}
            return self._query.get(loc.name)
        if self._cookies is None:
            self._cookies = {}
            raw = self.hdict.get("cookie")
            for line in ([raw] if isinstance(raw, str) else (raw or [])):
                for part in line.split(";"):
                    k, sep, v = part.strip().partition("=")
                    if sep and k not in self._cookies:
                        self._cookies[k] = v.strip('"')
        return self._cookies.get(loc.name)

    async def verify(self, p: Provider, auds: frozenset[str] | None) -> str:
        key = p.name if auds is None else f"{p.name}|{sorted(auds)}"
        r = self.results.get(key)
        if r is not None:
            return r
        found = self.extract(p)
        if found is None:
            r = MISSING
        else:
            r = await _verify_token(found, p, auds, self.core)
            if r == OK:
                self.ok.setdefault(p.name, found)
        self.results[key] = r
        return r

    def any_token(self, providers: tuple[Provider, ...]) -> bool:
        return any(self.extract(p) is not None for p in providers)


async def _verify_token(found: _Found, p: Provider, auds: frozenset[str] | None,
                        core: Any) -> str:
    token = found.token
    cache = p.jwks.verified
    cached = cache.get(token)
    if cached is not None:
        jwt = cached
    else:
        parsed = parse_jwt(token)
        if isinstance(parsed, str):
            return parsed
        jwt = parsed
    found.jwt = jwt
    pl = jwt.payload
    if p.issuer and jwt.iss != p.issuer:
        return UNKNOWN_ISSUER
    allowed = p.audiences if auds is None else auds
    if allowed and not (set(jwt.audiences) & allowed):
        return AUDIENCE
    now = time.time()
    exp = pl.get("exp")
    nbf = pl.get("nbf")
    if exp is not None and (not isinstance(exp, (int, float)) or isinstance(exp, bool)):
        return BAD_PAYLOAD
    if nbf is not None and (not isinstance(nbf, (int, float)) or isinstance(nbf, bool)):
        return BAD_PAYLOAD
    if exp is None and (p.require_expiration or p.max_lifetime_s):
        return NO_EXP
    if exp is not None and now > exp + p.clock_skew_s:
        return EXPIRED
    if nbf is not None and now + p.clock_skew_s < nbf:
        return NOT_YET_VALID
    if p.max_lifetime_s and exp is not None:
        iat = pl.get("iat", nbf if nbf is not None else now)
        if isinstance(iat, (int, float)) and exp - iat > p.max_lifetime_s:
            return EXPIRED
    if cached is not None:
        return OK
    keys = await p.jwks.get(core)
    if keys is None:
        return FETCH_FAIL
    alg, kid = jwt.alg, jwt.kid
    tried = False
    for k in keys:
        if kid and k.kid and k.kid != kid:
            continue
        if k.alg and k.alg != alg:
            continue
        tried = True
        if _verify_with(k, alg, jwt.signing_input, jwt.signature):
            if len(cache) >= VERIFIED_CACHE_SIZE:
                cache.clear()
            cache[token] = jwt
            return OK
    return VERIFICATION_FAIL if tried else KID_ALG


def _worse(a: str, b: str) -> str:
    """Which failure to report: a presented-but-bad token over a missing one."""
    if a == MISSING:
        return b
    return a


async def evaluate(req: Req, v: _Verification, providers: tuple[Provider, ...]) -> str:
    kind = req[0]
    if kind == "p":
        return await v.verify(req[1], req[2])
    if kind == "missing_or_failed":
        for p in providers:  # verify what is there (valid tokens still count)
            await v.verify(p, None)
        return OK
    if kind == "missing":
        for p in providers:
            r = await v.verify(p, None)
            if r != MISSING and r != OK:
                return r
        return OK
    if kind == "all":
        for k in req[1]:
            r = await evaluate(k, v, providers)
            if r != OK:
                return r
        return OK
    # any
    worst = MISSING
    allow_missing = allow_failed = False
    for k in req[1]:
        if k[0] == "missing":
            allow_missing = True
            continue
        if k[0] == "missing_or_failed":
            allow_failed = True
            continue
        r = await evaluate(k, v, providers)
        if r == OK:
            return OK
        worst = _worse(worst, r)
    if allow_failed:
        for p in providers:
            await v.verify(p, None)
        return OK
    if allow_missing and worst == MISSING:
        return OK
    return worst


# --------------------------------------------------------------------------- filter


def _claim(payload: dict[str, Any], name: str) -> Any:
    cur: Any = payload
    if name in payload:
        return payload[name]
    for part in name.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _claim_text(v: Any) -> str | None:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (str, int, float)):
        return str(v)
    if isinstance(v, list):
        items = [_claim_text(x) for x in v if not isinstance(x, (list, dict))]
        return ",".join(i for i in items if i is not None)
    return None


def _claims_for_rbac(payload: dict[str, Any], depth: int = 0) -> dict[str, Any]:
    """Istio's ``request.auth.claims``: every claim as a list of strings (nested objects
    as nested maps), which the RBAC metadata list matchers read."""
    out: dict[str, Any] = {}
    for k, v in payload.items():
        if isinstance(v, dict):
            if depth < 4:
                out[k] = _claims_for_rbac(v, depth + 1)
        elif isinstance(v, list):
            out[k] = [t for t in (_claim_text(x) for x in v if not isinstance(x, (list, dict)))
                      if t is not None]
        else:
            t = _claim_text(v)
            if t is not None:
                out[k] = [t]
    return out


_CODE_FOR = {AUDIENCE: 403}


class JwtAuthnFilter:
    __slots__ = ("bypass_cors_preflight", "kind", "name", "providers", "rules", "strip_failure")

    def __init__(self, name: str, providers: tuple[Provider, ...], rules: tuple[Rule, ...],
                 bypass_cors_preflight: bool = False, strip_failure: bool = False) -> None:
        self.name = name
        self.kind = "jwt_authn"
        self.providers = providers
        self.rules = rules
        self.bypass_cors_preflight = bypass_cors_preflight
        self.strip_failure = strip_failure

    @classmethod
    def from_proto(cls, ctx: Ctx, msg: Any, path: str, name: str) -> JwtAuthnFilter:
        ctx.only(msg, {"providers", "rules", "bypass_cors_preflight", "requirement_map",
                       "strip_failure_response", "stat_prefix"}, path)
        providers = {pn: _provider(ctx, pn, p, f"{join(path, 'providers')}[{pn}]")
                     for pn, p in sorted(msg.providers.items())}
        reqmap = {rn: _requirement(ctx, r, providers, f"{join(path, 'requirement_map')}[{rn}]")
                  for rn, r in sorted(msg.requirement_map.items())}
        rules = tuple(_rule(ctx, r, providers, reqmap, f"{join(path, 'rules')}[{i}]")
                      for i, r in enumerate(msg.rules))
        return cls(name, tuple(providers.values()), rules, msg.bypass_cors_preflight,
                   msg.strip_failure_response)

    def requirement(self, path: str, hdict: dict[str, Any]) -> Req | None:
        for r in self.rules:
            if r.matches(path, hdict):
                return r.requires
        return None

    def decode(self, st: Any, route: Any) -> Any:
        req = self.requirement(st.path, st.hdict)
        if req is None:
            return True
        if self.bypass_cors_preflight and st.method == "OPTIONS" and \
                "origin" in st.hdict and "access-control-request-method" in st.hdict:
            return True
        return self._run(st, req)

    async def _run(self, st: Any, req: Req) -> bool:
        v = _Verification(st.conn.ctx.proxy, st.hdict, st.path)
        status = await evaluate(req, v, self.providers)
        stats = st.conn._http_stats
        if status != OK:
            stats.inc("jwt_authn.denied")
            self._deny(st, status)
            return False
        stats.inc("jwt_authn.allowed")
        if v.ok:
            self._apply(st, v)
        return True

    def _deny(self, st: Any, status: str) -> None:
        from isthmus.dataplane.http.router import local_reply

        code = _CODE_FOR.get(status, 401)
        host = st.authority
        realm = f"http://{host}{st.path.split('?', 1)[0]}"
        extra = [(b"www-authenticate",
                  f'Bearer realm="{realm}", error="invalid_token"'.encode("latin-1", "replace"))]
        st.details = "jwt_authn_access_denied{" + status.replace(" ", "_") + "}"
        log.debug("jwt_authn: %s %s: %s", st.method, st.path, status)
        local_reply(st, code, b"" if self.strip_failure else status.encode(), "", extra)

    def _apply(self, st: Any, v: _Verification) -> None:
        hdict = st.hdict
        jwt_md: dict[str, Any] = {}
        authn: dict[str, Any] | None = None
        for found in v.ok.values():
            p, jwt = found.provider, found.jwt
            if jwt is None:
                continue
            if not p.forward and found.location.kind == "header":
                hdict.pop(found.location.name, None)
            if p.forward_payload_header:
                pl = jwt.payload_b64
                if p.pad_forward_payload_header:
                    pl += "=" * (-len(pl) % 4)
                hdict[p.forward_payload_header] = pl
            for header, claim in p.claim_to_headers:
                t = _claim_text(_claim(jwt.payload, claim))
                if t is not None:
                    hdict[header] = t
            if p.payload_in_metadata:
                jwt_md[p.payload_in_metadata] = jwt.payload
            if authn is None:
                authn = {"request.auth.principal": f"{jwt.iss}/{jwt.sub}",
                         "request.auth.claims": _claims_for_rbac(jwt.payload),
                         "request.auth.raw_claims": json.dumps(jwt.payload)}
                auds = jwt.audiences
                if auds:
                    authn["request.auth.audiences"] = auds[0]
                azp = jwt.payload.get("azp")
                if isinstance(azp, str):
                    authn["request.auth.presenter"] = azp
        if jwt_md:
            set_metadata(st, DYN_JWT, jwt_md)
        if authn is not None:
            set_metadata(st, DYN_ISTIO_AUTHN, authn)


__all__ = [
    "Jwk",
    "JwksSource",
    "Jwt",
    "JwtAuthnFilter",
    "Provider",
    "parse_jwks",
    "parse_jwt",
]
