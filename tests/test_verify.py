"""The resource-server verifier (leanauth.verify.TokenVerifier) against forged and malformed
tokens (RFC 8725, RFC 9068): every forgery is refused with InvalidToken, real tokens from
the running server are accepted.

Forgeries that must fail on one claim only are signed by our own ES256 key, published in a
JWKS served from loopback by this module, so the signature is good and only the claim under
test is wrong; a control test shows the unaltered forgery is accepted.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from conftest import AppCredentials, Server, request_token, wait_for
from leanauth.verify import (
    MAX_TOKEN_LIFETIME,
    InvalidToken,
    TokenVerifier,
    VerificationUnavailable,
    VerifiedToken,
)

API_AUDIENCE = "urn:leanauth:api"
LINK_AUDIENCE = "urn:leanauth:link"
ISSUER = "https://auth.example.com"  # the issuer of the forgeries signed by our own key
CLIENT_ID = "app_forged"
CUSTOMER_UUID = "7b0e4b1e-2c55-4c1a-9d0a-3f5e6d7c8b9a"
MISSING = object()  # a claim or header member to leave out


# JOSE by hand, so that anything at all can be put in a token


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def segment(part: Any) -> str:
    """A compact-JWS segment: bytes as they are, anything else as JSON."""
    raw = part if isinstance(part, bytes) else json.dumps(part, separators=(",", ":")).encode()
    return b64(raw)


def signed(header: Any, claims: Any, key: Any, alg: str | None = None) -> str:
    """A JWS signed by ``key`` with ``alg`` (default: the header's)."""
    signing_input = f"{segment(header)}.{segment(claims)}"
    algorithm = jwt.get_algorithm_by_name(alg or header["alg"])
    return f"{signing_input}.{b64(algorithm.sign(signing_input.encode(), key))}"


def hmac_signed(header: Any, claims: Any, secret: bytes, digest: Any = hashlib.sha256) -> str:
    signing_input = f"{segment(header)}.{segment(claims)}"
    mac = hmac.new(secret, signing_input.encode(), digest).digest()
    return f"{signing_input}.{b64(mac)}"


def parts(token: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    header, claims, signature = token.split(".")
    return json.loads(unb64(header)), json.loads(unb64(claims)), signature


def replaced(token: str, header: Any = None, claims: Any = None) -> str:
    """``token`` with its header and/or claims replaced and its signature kept."""
    old_header, old_claims, signature = token.split(".")
    new_header = old_header if header is None else segment(header)
    new_claims = old_claims if claims is None else segment(claims)
    return f"{new_header}.{new_claims}.{signature}"


def changed(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    result = dict(base)
    for name, value in changes.items():
        if value is MISSING:
            result.pop(name, None)
        else:
            result[name] = value
    return result


def good_claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "sub": CLIENT_ID,
        "aud": API_AUDIENCE,
        "exp": now + 600,
        "nbf": now,
        "iat": now,
        "jti": uuid.uuid4().hex,
        "client_id": CLIENT_ID,
        "scope": "api",
        "applications": [{"id": CLIENT_ID}],
    }
    return changed(claims, **changes)


@dataclass
class Key:
    kid: str
    alg: str
    private: Any

    def jwk(self, **changes: Any) -> dict[str, Any]:
        public = jwt.get_algorithm_by_name(self.alg).to_jwk(self.private.public_key(), as_dict=True)
        return changed({**public, "kid": self.kid, "alg": self.alg, "use": "sig"}, **changes)

    def header(self, **changes: Any) -> dict[str, Any]:
        return changed({"alg": self.alg, "typ": "at+jwt", "kid": self.kid}, **changes)

    def token(self, header: dict[str, Any] | None = None, **claim_changes: Any) -> str:
        return signed(header or self.header(), good_claims(**claim_changes), self.private)


def ec_key(kid: str = "own-es256") -> Key:
    return Key(kid, "ES256", ec.generate_private_key(ec.SECP256R1()))


class JwksServer:
    """A JWKS on loopback that answers every GET with ``keys`` and records the paths."""

    def __init__(self, keys: list[dict[str, Any]]) -> None:
        self.keys = keys
        self.status = 200
        self.paths: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.paths.append(self.path)
                body = json.dumps({"keys": outer.keys}).encode()
                self.send_response(outer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    @property
    def jwks_url(self) -> str:
        return self.url + "/oauth2/jwks"

    @property
    def fetches(self) -> int:
        return len(self.paths)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


# Fixtures


@pytest.fixture(scope="module")
def own_key() -> Key:
    return ec_key()


@pytest.fixture
def own_jwks(own_key: Key) -> Iterator[JwksServer]:
    jwks = JwksServer([own_key.jwk()])
    yield jwks
    jwks.close()


@pytest.fixture
def own_verifier(own_jwks: JwksServer) -> TokenVerifier:
    return TokenVerifier(issuer=ISSUER, audience=API_AUDIENCE, jwks_url=own_jwks.jwks_url)


@pytest.fixture(scope="module")
def api_token(server: Server, app: AppCredentials) -> str:
    response = request_token(server, app, "api")
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


@pytest.fixture(scope="module")
def customer_token(server: Server, app: AppCredentials, customer_id: str) -> str:
    response = request_token(server, app, f"customer.{customer_id}")
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


def server_verifier(server: Server, audience: str = API_AUDIENCE, **options: Any) -> TokenVerifier:
    return TokenVerifier(
        issuer=server.url, audience=audience, jwks_url=server.url + "/oauth2/jwks", **options
    )


@pytest.fixture
def verifier(server: Server) -> TokenVerifier:
    return server_verifier(server)


@pytest.fixture(scope="module")
def real_jwk(server: Server, api_token: str) -> dict[str, Any]:
    """The served JWKS entry of the key that signed ``api_token``."""
    kid = parts(api_token)[0]["kid"]
    keys = httpx.get(server.url + "/oauth2/jwks", timeout=10).json()["keys"]
    return next(key for key in keys if key["kid"] == kid)


def server_claims(server: Server, app: AppCredentials, **changes: Any) -> dict[str, Any]:
    """Claims the running server would accept, but for the signature."""
    return good_claims(iss=server.url, sub=app.client_id, client_id=app.client_id, **changes)


def refused(verifier: TokenVerifier, token: Any) -> InvalidToken:
    with pytest.raises(InvalidToken) as caught:
        verifier.verify(token)
    return caught.value


# Real tokens


def test_real_api_token_is_accepted(
    verifier: TokenVerifier, api_token: str, app: AppCredentials
) -> None:
    token = verifier.verify(api_token)
    assert isinstance(token, VerifiedToken)
    assert (token.client_id, token.subject, token.scope) == (app.client_id, app.client_id, "api")
    assert token.customer_id is None
    assert token.scope_class == "api"
    assert token.expires_at > time.time() > token.issued_at - 30
    assert token.jti == parts(api_token)[1]["jti"]


def test_real_customer_token_is_accepted_for_the_link_audience(
    server: Server, customer_token: str, customer_id: str, app: AppCredentials
) -> None:
    token = server_verifier(server, LINK_AUDIENCE).verify(customer_token)
    assert token.client_id == app.client_id
    assert token.customer_id == customer_id
    assert token.scope == f"customer.{customer_id}"
    assert token.scope_class == "customer"


def test_real_api_token_is_refused_for_the_link_audience(server: Server, api_token: str) -> None:
    refused(server_verifier(server, LINK_AUDIENCE), api_token)


def test_real_customer_token_is_refused_for_the_api_audience(
    verifier: TokenVerifier, customer_token: str
) -> None:
    refused(verifier, customer_token)


@pytest.mark.parametrize(
    "look_alike",
    [
        lambda url: url + "/",
        lambda url: url + "/x",
        lambda url: url[:-1],
        lambda url: url + "0",
        lambda url: "https://evil" + url.removeprefix("http://"),
        lambda url: "https://evil.example/" + url,
        lambda url: url.replace("http://", "https://"),
        lambda url: url.upper(),
    ],
    ids=["slash", "path", "prefix", "longer-port", "evil-host", "evil-path", "https", "upper"],
)
def test_real_token_is_refused_by_a_verifier_of_a_look_alike_issuer(
    server: Server, api_token: str, look_alike: Callable[[str], str]
) -> None:
    verifier = TokenVerifier(
        issuer=look_alike(server.url),
        audience=API_AUDIENCE,
        jwks_url=server.url + "/oauth2/jwks",
    )
    refused(verifier, api_token)


# "none" and HMAC forgeries against the server's real key


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
@pytest.mark.parametrize("keep_signature", [False, True], ids=["unsigned", "real-signature"])
def test_alg_none_is_refused(
    verifier: TokenVerifier, api_token: str, alg: str, keep_signature: bool
) -> None:
    header = parts(api_token)[0]
    token = replaced(api_token, header={**header, "alg": alg})
    if not keep_signature:
        token = token.rsplit(".", 1)[0] + "."
    refused(verifier, token)


def public_key_forms(jwk: dict[str, Any]) -> dict[str, bytes]:
    public = jwt.PyJWK(jwk).key
    return {
        "pem": public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        "der": public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        "jwk-json": json.dumps(jwk).encode(),
        "jwk-json-compact": json.dumps(jwk, separators=(",", ":")).encode(),
        "point": public.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        ),
    }


@pytest.mark.parametrize("form", ["pem", "der", "jwk-json", "jwk-json-compact", "point"])
@pytest.mark.parametrize(
    ("alg", "digest"),
    [("HS256", hashlib.sha256), ("HS384", hashlib.sha384), ("HS512", hashlib.sha512)],
    ids=["HS256", "HS384", "HS512"],
)
def test_hmac_with_the_public_key_as_secret_is_refused(
    server: Server,
    app: AppCredentials,
    verifier: TokenVerifier,
    real_jwk: dict[str, Any],
    form: str,
    alg: str,
    digest: Any,
) -> None:
    secret = public_key_forms(real_jwk)[form]
    header = {"alg": alg, "typ": "at+jwt", "kid": real_jwk["kid"]}
    refused(verifier, hmac_signed(header, server_claims(server, app), secret, digest))


def attacker_key(alg: str) -> Any:
    if alg in ("RS256", "PS256"):
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    curves = {"ES256": ec.SECP256R1(), "ES384": ec.SECP384R1(), "ES512": ec.SECP521R1()}
    return ec.generate_private_key(curves[alg])


@pytest.mark.parametrize("alg", ["RS256", "PS256", "EdDSA", "ES384", "ES512"])
def test_header_alg_other_than_the_keys_is_refused(
    server: Server, app: AppCredentials, verifier: TokenVerifier, real_jwk: dict[str, Any], alg: str
) -> None:
    header = {"alg": alg, "typ": "at+jwt", "kid": real_jwk["kid"]}
    refused(verifier, signed(header, server_claims(server, app), attacker_key(alg)))


@pytest.mark.parametrize(
    "alg",
    ["es256", "ES256 ", "RS256", ["ES256"], {"ES256": 1}, 256, None],
    ids=["lower", "space", "RS256", "list", "object", "number", "null"],
)
def test_header_alg_not_the_keys_is_refused_on_a_real_token(
    verifier: TokenVerifier, api_token: str, alg: Any
) -> None:
    # The header is signed, so any change breaks the signature too; what matters is that
    # each is an InvalidToken (not a TypeError on an unhashable alg, say).
    header = parts(api_token)[0]
    refused(verifier, replaced(api_token, header={**header, "alg": alg}))


def test_header_alg_mismatch_is_refused_even_when_signed_by_the_published_key() -> None:
    # The published key is an RSA key for RS256; a PS256 signature by that same key is good
    # RSA, but the key's algorithm decides.
    rsa_key = Key("own-rsa", "RS256", attacker_key("RS256"))
    jwks = JwksServer([rsa_key.jwk()])
    try:
        verifier = TokenVerifier(issuer=ISSUER, audience=API_AUDIENCE, jwks_url=jwks.jwks_url)
        assert verifier.verify(rsa_key.token()).client_id == CLIENT_ID
        refused(verifier, rsa_key.token(header=rsa_key.header(alg="PS256")))
    finally:
        jwks.close()


# Headers that name other keys are never followed


def self_signed_certificate(private: Any) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "attacker")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(private, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize("member", ["jku", "x5u", "jwk", "x5c"])
@pytest.mark.parametrize("kid_of", ["attacker", "real"])
def test_key_naming_headers_are_ignored(
    server: Server,
    app: AppCredentials,
    verifier: TokenVerifier,
    real_jwk: dict[str, Any],
    member: str,
    kid_of: str,
) -> None:
    attacker = ec_key("attacker")
    kid = attacker.kid if kid_of == "attacker" else real_jwk["kid"]
    attacker_jwks = JwksServer([attacker.jwk(), attacker.jwk(kid=real_jwk["kid"])])
    try:
        pointer: Any = {
            "jku": attacker_jwks.jwks_url,
            "x5u": attacker_jwks.url + "/attacker.pem",
            "jwk": attacker.jwk(kid=kid),
            "x5c": [base64.b64encode(self_signed_certificate(attacker.private)).decode()],
        }[member]
        header = attacker.header(kid=kid, **{member: pointer})
        refused(verifier, signed(header, server_claims(server, app), attacker.private))
        assert attacker_jwks.paths == []
    finally:
        attacker_jwks.close()


def test_real_token_with_an_added_jku_is_refused(verifier: TokenVerifier, api_token: str) -> None:
    # Otherwise unchanged, but the header is part of the signing input: adding anything to
    # it breaks the signature, whatever the verifier thinks of jku.
    header = parts(api_token)[0]
    refused(verifier, replaced(api_token, header={**header, "jku": "http://127.0.0.1:9/jwks"}))


# Damaged and malformed tokens


def test_tampered_payload_is_refused(verifier: TokenVerifier, api_token: str) -> None:
    claims = parts(api_token)[1]
    for change in ({"client_id": "app_other"}, {"exp": claims["exp"] + 3600}, {"jti": "x"}):
        refused(verifier, replaced(api_token, claims={**claims, **change}))


@pytest.mark.parametrize(
    "damage",
    [
        lambda token: token[:-4],
        lambda token: token[:-1],
        lambda token: token.rsplit(".", 1)[0] + ".",
        lambda token: token[:-2] + ("AA" if not token.endswith("AA") else "BA"),
        lambda token: token + "AAAA",
    ],
    ids=["truncated", "one-char-short", "no-signature", "flipped", "longer"],
)
def test_damaged_signature_is_refused(
    verifier: TokenVerifier, api_token: str, damage: Callable[[str], str]
) -> None:
    refused(verifier, damage(api_token))


@pytest.mark.parametrize("padding", ["=", "=="])
def test_padded_signature_is_refused(verifier: TokenVerifier, api_token: str, padding: str) -> None:
    # Compact JWS segments are base64url without padding (RFC 7515 §2); a padded copy of a
    # token is a different string for the same token (caches, deny-lists keyed by token).
    refused(verifier, api_token + padding)


def test_der_encoded_es256_signature_is_refused(own_key: Key, own_verifier: TokenVerifier) -> None:
    # JWS carries ES256 as raw r||s (RFC 7518 §3.4); a DER signature is not a JWS.
    signing_input = f"{segment(own_key.header())}.{segment(good_claims())}"
    der = own_key.private.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
    refused(own_verifier, f"{signing_input}.{b64(der)}")


@pytest.mark.parametrize(
    "mangle",
    [
        lambda token: ".".join(token.split(".")[:2]),
        lambda token: token + ".",
        lambda token: token + "." + token.split(".")[2],
        lambda token: token.replace(".", ".."),
        lambda token: "." + token,
        lambda token: token.replace(".", " . "),
        lambda token: " " + token,
        lambda token: token + "\n",
    ],
    ids=[
        "2-segments",
        "4-segments",
        "4-segments-signed",
        "empty-segments",
        "leading-dot",
        "spaced",
        "leading-space",
        "trailing-newline",
    ],
)
def test_malformed_compact_form_is_refused(
    verifier: TokenVerifier, api_token: str, mangle: Callable[[str], str]
) -> None:
    refused(verifier, mangle(api_token))


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        ".",
        "..",
        "...",
        "a.b.c",
        "é.ü.ö",
        "🙂.🙂.🙂",
        "\x00.\x00.\x00",
        "\uff45\uff59\uff2a.\uff45\uff59\uff2a.\uff45\uff59\uff2a",  # full-width "eyJ"
        "Bearer x.y.z",
        "null",
        b"x.y.z",
        None,
        123,
    ],
)
def test_garbage_is_refused(verifier: TokenVerifier, garbage: Any) -> None:
    refused(verifier, garbage)


def test_garbage_around_a_real_token_is_refused(verifier: TokenVerifier, api_token: str) -> None:
    header, claims, signature = api_token.split(".")
    for token in (f"{header}é.{claims}.{signature}", f"{header}.{claims}.{signature}🙂"):
        refused(verifier, token)


def test_a_1mb_token_is_refused(verifier: TokenVerifier, api_token: str) -> None:
    header, _, signature = api_token.split(".")
    refused(verifier, f"{header}.{'A' * 1_000_000}.{signature}")
    refused(verifier, "A" * 1_000_000)


def nested_arrays(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def nested_objects(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


@pytest.mark.parametrize(
    "raw_header",
    [
        nested_arrays(10_000),
        nested_arrays(2_500),  # small enough to be parsed: deeper than the recursion limit
        nested_objects(1_000),
        b'{"alg":"ES256","typ":"at+jwt","kid":"own-es256","x":' + nested_arrays(2_400) + b"}",
    ],
    ids=["arrays-10000", "arrays-2500", "objects-1000", "inside-a-good-header"],
)
def test_deeply_nested_header_is_refused(
    own_key: Key, own_verifier: TokenVerifier, raw_header: bytes
) -> None:
    signing_input = f"{b64(raw_header)}.{segment(good_claims())}"
    signature = jwt.get_algorithm_by_name("ES256").sign(signing_input.encode(), own_key.private)
    refused(own_verifier, f"{signing_input}.{b64(signature)}")


@pytest.mark.parametrize(
    "raw_claims",
    [nested_arrays(10_000), nested_arrays(2_500), nested_objects(1_000)],
    ids=["arrays-10000", "arrays-2500", "objects-1000"],
)
def test_deeply_nested_payload_is_refused(
    own_key: Key, own_verifier: TokenVerifier, raw_claims: bytes
) -> None:
    # Signed by the published key: the payload is parsed only after the signature checks.
    refused(own_verifier, signed(own_key.header(), raw_claims, own_key.private))


@pytest.mark.parametrize(
    "raw",
    [b"[]", b'"at+jwt"', b"null", b"1", b"{", b'{"alg":"ES256"', b"\xff\xfe", b""],
    ids=["list", "string", "null", "number", "open", "unclosed", "not-utf8", "empty"],
)
def test_header_or_payload_that_is_not_a_json_object_is_refused(
    own_key: Key, own_verifier: TokenVerifier, raw: bytes
) -> None:
    refused(own_verifier, f"{b64(raw)}.{segment(good_claims())}.{b64(b'x' * 64)}")
    refused(own_verifier, signed(own_key.header(), raw, own_key.private))


# Signed by the published key, wrong in one thing only


def test_control_a_good_forgery_is_accepted(own_key: Key, own_verifier: TokenVerifier) -> None:
    token = own_verifier.verify(own_key.token())
    assert (token.client_id, token.scope, token.customer_id) == (CLIENT_ID, "api", None)


@pytest.mark.parametrize(
    "typ", ["at+jwt", "AT+JWT", "at+JWT", "application/at+jwt", "Application/AT+JWT"]
)
def test_typ_at_jwt_is_accepted_in_any_case(
    own_key: Key, own_verifier: TokenVerifier, typ: str
) -> None:
    # Media types are case-insensitive (RFC 7515 §4.1.9), with or without "application/".
    assert own_verifier.verify(own_key.token(own_key.header(typ=typ))).client_id == CLIENT_ID


@pytest.mark.parametrize(
    "typ",
    [
        "JWT",
        "jwt",
        "application/jwt",
        "JOSE",
        "at+jwt ",
        "at+jwt; x=y",
        "at-jwt",
        "",
        None,
        1,
        ["at+jwt"],
        {"at+jwt": True},
        MISSING,
    ],
)
def test_other_typ_is_refused(own_key: Key, own_verifier: TokenVerifier, typ: Any) -> None:
    refused(own_verifier, own_key.token(own_key.header(typ=typ)))


@pytest.mark.parametrize(
    "iss",
    [
        ISSUER + "/",
        ISSUER + "/x",
        ISSUER[:-1],
        ISSUER + ".evil.example",
        "https://evil" + ISSUER.removeprefix("https://"),
        "https://evil.example/" + ISSUER,
        "http://auth.example.com",
        ISSUER.upper(),
        "",
        [ISSUER],
        {"iss": ISSUER},
        1,
    ],
)
def test_other_issuer_is_refused(own_key: Key, own_verifier: TokenVerifier, iss: Any) -> None:
    refused(own_verifier, own_key.token(iss=iss))


@pytest.mark.parametrize(
    "aud",
    [
        MISSING,
        None,
        "",
        LINK_AUDIENCE,
        "urn:evil",
        API_AUDIENCE[:-1],
        API_AUDIENCE + ":x",
        API_AUDIENCE.upper(),
        [API_AUDIENCE],
        [API_AUDIENCE, "urn:evil"],
        ["urn:evil", API_AUDIENCE],
        [],
        {"aud": API_AUDIENCE},
    ],
)
def test_other_audience_is_refused(own_key: Key, own_verifier: TokenVerifier, aud: Any) -> None:
    # Only one string audience is ever accepted: a list, even of ours alone, is refused.
    refused(own_verifier, own_key.token(aud=aud))


@pytest.mark.parametrize(
    ("claim", "offset"),
    [("exp", -10), ("nbf", 10), ("iat", 10)],
)
def test_time_claims_within_the_leeway_are_accepted(
    own_key: Key, own_verifier: TokenVerifier, claim: str, offset: int
) -> None:
    assert own_verifier.verify(own_key.token(**{claim: int(time.time()) + offset}))


@pytest.mark.parametrize(
    ("claim", "offset"),
    [("exp", -60), ("exp", -86_400), ("nbf", 60), ("nbf", 86_400), ("iat", 60), ("iat", 86_400)],
    ids=["expired", "expired-long-ago", "not-yet-valid", "nbf-far", "iat-future", "iat-far"],
)
def test_time_claims_beyond_the_leeway_are_refused(
    own_key: Key, own_verifier: TokenVerifier, claim: str, offset: int
) -> None:
    refused(own_verifier, own_key.token(**{claim: int(time.time()) + offset}))


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
@pytest.mark.parametrize(
    "value", ["soon", None, [1], {"t": 1}], ids=["word", "null", "list", "object"]
)
def test_time_claims_that_are_not_numbers_are_refused(
    own_key: Key, own_verifier: TokenVerifier, claim: str, value: Any
) -> None:
    refused(own_verifier, own_key.token(**{claim: value}))


@pytest.mark.parametrize(
    ("iat", "exp"),
    [(0, 86_400), (-86_000, 400), (-60, 86_340)],
    ids=["from-now", "nearly-over", "a-minute-old"],
)
def test_the_longest_lifetime_the_server_issues_is_accepted(
    own_key: Key, own_verifier: TokenVerifier, iat: int, exp: int
) -> None:
    now = int(time.time())
    assert MAX_TOKEN_LIFETIME == 86_400
    assert own_verifier.verify(own_key.token(iat=now + iat, nbf=now + iat, exp=now + exp))


@pytest.mark.parametrize(
    ("iat", "exp"),
    [(0, 86_401), (-86_001, 400), (-60, 86_341), (0, 10 * 365 * 86_400)],
    ids=["from-now", "nearly-over", "a-minute-old", "ten-years"],
)
def test_a_lifetime_beyond_the_servers_longest_is_refused(
    own_key: Key, own_verifier: TokenVerifier, iat: int, exp: int
) -> None:
    # No leanauth server issues such a token: a forgery, or a broken server. What counts is
    # exp - iat, whatever the time left.
    now = int(time.time())
    error = refused(own_verifier, own_key.token(iat=now + iat, nbf=now + iat, exp=now + exp))
    assert "lifetime" in error.reason


def test_max_lifetime_is_configurable(own_key: Key, own_jwks: JwksServer) -> None:
    verifier = TokenVerifier(
        issuer=ISSUER, audience=API_AUDIENCE, jwks_url=own_jwks.jwks_url, max_lifetime=600
    )
    now = int(time.time())
    assert verifier.verify(own_key.token(iat=now, exp=now + 600))
    refused(verifier, own_key.token(iat=now, exp=now + 601))


@pytest.mark.parametrize("claim", ["iss", "sub", "aud", "exp", "iat", "jti", "client_id", "scope"])
@pytest.mark.parametrize("how", ["missing", "null"])
def test_every_required_claim_is_required(
    own_key: Key, own_verifier: TokenVerifier, claim: str, how: str
) -> None:
    refused(own_verifier, own_key.token(**{claim: MISSING if how == "missing" else None}))


@pytest.mark.parametrize(
    "changes",
    [
        {"sub": "app_other"},
        {"client_id": "app_other"},
        {"sub": CLIENT_ID.upper()},
        {"sub": 1},
        {"client_id": 1},
        {"jti": 1},
        {"scope": 1},
        {"scope": ["api"]},
    ],
)
def test_sub_client_id_and_claim_types_must_agree(
    own_key: Key, own_verifier: TokenVerifier, changes: dict[str, Any]
) -> None:
    refused(own_verifier, own_key.token(**changes))


def test_control_a_customer_scope_with_its_customers_claim_is_accepted(
    own_key: Key, own_verifier: TokenVerifier
) -> None:
    customer = str(uuid.uuid4())
    token = own_key.token(scope=f"customer.{customer}", customers=[{"id": customer}])
    assert own_verifier.verify(token).customer_id == customer


@pytest.mark.parametrize(
    "customers",
    [
        MISSING,
        None,
        [],
        [{"id": "other"}],
        [{"id": "X"}, {"id": "other"}],
        [{"id": "X"}, {"id": "X"}],
        [{"id": "X", "extra": 1}],
        [{"id": "x"}],
        {"id": "X"},
        ["X"],
        "X",
    ],
)
def test_customer_scope_without_its_customers_claim_is_refused(
    own_key: Key, own_verifier: TokenVerifier, customers: Any
) -> None:
    refused(own_verifier, own_key.token(scope="customer.X", customers=customers))


@pytest.mark.parametrize(
    "scope",
    ["", "admin", "API", "api ", " api", "api customer.X", "customer", "customers.X", "openid"],
)
def test_unknown_scope_is_refused(own_key: Key, own_verifier: TokenVerifier, scope: str) -> None:
    refused(own_verifier, own_key.token(scope=scope, customers=[{"id": "X"}]))


@pytest.mark.parametrize(
    "crit",
    [["urn:example:unknown"], ["exp"], ["b64"], [], "urn:example:unknown", None],
)
def test_any_crit_header_is_refused(own_key: Key, own_verifier: TokenVerifier, crit: Any) -> None:
    header = own_key.header(crit=crit)
    if crit == ["b64"]:
        header["b64"] = True
    refused(own_verifier, own_key.token(header))


# kid handling and the JWKS


@pytest.mark.parametrize(
    "kid",
    [
        MISSING,
        None,
        "",
        "x" * 129,
        "x" * 5000,
        12345,
        ["own-es256"],
        {"kid": "own-es256"},
        True,
        "../../etc/passwd",
        "own-es256/../../etc/passwd",
        "own-es256\r\nX-Injected: 1",
        "\x00",
        "own-es256 ",
        "OWN-ES256",
    ],
)
def test_hostile_or_unknown_kid_is_refused(
    own_key: Key, own_verifier: TokenVerifier, own_jwks: JwksServer, kid: Any
) -> None:
    refused(own_verifier, own_key.token(own_key.header(kid=kid)))
    # The kid never reaches a URL: only the configured JWKS is ever fetched.
    assert set(own_jwks.paths) <= {"/oauth2/jwks"}


def test_random_unknown_kid_is_refused_on_the_real_server(
    server: Server, app: AppCredentials, verifier: TokenVerifier
) -> None:
    attacker = ec_key(uuid.uuid4().hex)
    refused(verifier, signed(attacker.header(), server_claims(server, app), attacker.private))


def test_unknown_kids_refetch_the_jwks_at_most_once_per_interval(
    own_key: Key, own_jwks: JwksServer
) -> None:
    verifier = TokenVerifier(
        issuer=ISSUER, audience=API_AUDIENCE, jwks_url=own_jwks.jwks_url, jwks_refetch_interval=30
    )
    verifier.verify(own_key.token())
    for _ in range(20):
        refused(verifier, own_key.token(own_key.header(kid=uuid.uuid4().hex)))
    assert own_jwks.fetches <= 2
    verifier.verify(own_key.token())  # the known key is still served from the cache
    assert own_jwks.fetches <= 2


def test_unknown_kids_refetch_at_most_once_concurrently_with_averify(
    own_key: Key, own_jwks: JwksServer
) -> None:
    verifier = TokenVerifier(issuer=ISSUER, audience=API_AUDIENCE, jwks_url=own_jwks.jwks_url)
    tokens = [own_key.token(own_key.header(kid=uuid.uuid4().hex)) for _ in range(20)]

    async def verify_all() -> list[Any]:
        return await asyncio.gather(*map(verifier.averify, tokens), return_exceptions=True)

    results = asyncio.run(verify_all())
    assert all(isinstance(result, InvalidToken) for result in results), results
    assert own_jwks.fetches <= 2


def test_concurrent_first_verifications_share_one_jwks_fetch(
    own_key: Key, own_jwks: JwksServer
) -> None:
    # Callers that wait while another fetches the JWKS use the key set it fetched.
    verifier = TokenVerifier(issuer=ISSUER, audience=API_AUDIENCE, jwks_url=own_jwks.jwks_url)
    tokens = [own_key.token() for _ in range(20)]
    barrier = threading.Barrier(len(tokens))
    outcomes: list[Any] = []

    def call(token: str) -> None:
        barrier.wait(timeout=10)
        try:
            outcomes.append(verifier.verify(token).client_id)
        except Exception as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=call, args=(token,)) for token in tokens]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert outcomes == [CLIENT_ID] * len(tokens)
    assert own_jwks.fetches == 1


def test_concurrent_first_averify_calls_share_one_jwks_fetch(
    own_key: Key, own_jwks: JwksServer
) -> None:
    verifier = TokenVerifier(issuer=ISSUER, audience=API_AUDIENCE, jwks_url=own_jwks.jwks_url)
    tokens = [own_key.token() for _ in range(20)]

    async def verify_all() -> list[Any]:
        return await asyncio.gather(*map(verifier.averify, tokens), return_exceptions=True)

    results = asyncio.run(verify_all())
    assert [getattr(result, "client_id", result) for result in results] == [CLIENT_ID] * 20
    assert own_jwks.fetches == 1


def test_a_key_added_to_the_jwks_is_found_after_the_refetch_interval(
    own_key: Key, own_jwks: JwksServer
) -> None:
    verifier = TokenVerifier(
        issuer=ISSUER, audience=API_AUDIENCE, jwks_url=own_jwks.jwks_url, jwks_refetch_interval=1
    )
    verifier.verify(own_key.token())
    new_key = ec_key("own-new")
    own_jwks.keys.append(new_key.jwk())
    token = new_key.token()
    refused(verifier, token)  # within the interval, the cached JWKS is not refetched

    def accepted() -> bool:
        try:
            return verifier.verify(token).client_id == CLIENT_ID
        except InvalidToken:
            return False

    wait_for(accepted, timeout=5)
    assert own_jwks.fetches == 2


def test_a_failing_jwks_is_not_refetched_for_every_token(
    own_key: Key, own_jwks: JwksServer
) -> None:
    # While the JWKS answers 500, no token can be checked (503, not 401: the token may be
    # good); but the refetch limit still holds, or each request to the resource server
    # becomes a request to the authorization server.
    own_jwks.status = 500
    verifier = TokenVerifier(
        issuer=ISSUER, audience=API_AUDIENCE, jwks_url=own_jwks.jwks_url, jwks_refetch_interval=30
    )
    for _ in range(20):
        with pytest.raises(VerificationUnavailable) as caught:
            verifier.verify(own_key.token())
        assert 0 < caught.value.retry_after <= 30
    assert own_jwks.fetches <= 2


@pytest.fixture
def hmac_secret() -> bytes:
    return b"s" * 32


def unusable_entries(key: Key, secret: bytes) -> dict[str, dict[str, Any]]:
    """JWKS entries a verifier must never use, by the kid of each."""
    oct_key = {"kty": "oct", "k": b64(secret), "use": "sig"}
    return {
        "oct-hs256": {**oct_key, "kid": "oct-hs256", "alg": "HS256"},
        "oct-es256": {**oct_key, "kid": "oct-es256", "alg": "ES256"},
        "oct-no-alg": {**oct_key, "kid": "oct-no-alg"},
        "ec-no-alg": key.jwk(kid="ec-no-alg", alg=MISSING),
        "ec-hs256": key.jwk(kid="ec-hs256", alg="HS256"),
        "ec-none": key.jwk(kid="ec-none", alg="none"),
        "ec-enc": key.jwk(kid="ec-enc", use="enc"),
        "ec-alg-list": key.jwk(kid="ec-alg-list", alg=["ES256"]),
    }


@pytest.mark.parametrize("kid", list(unusable_entries(ec_key(), b"s" * 32)))
def test_unusable_jwks_entries_are_never_used(
    own_key: Key, own_jwks: JwksServer, hmac_secret: bytes, kid: str
) -> None:
    entries = unusable_entries(own_key, hmac_secret)
    own_jwks.keys = [entries[kid], own_key.jwk()]
    verifier = TokenVerifier(issuer=ISSUER, audience=API_AUDIENCE, jwks_url=own_jwks.jwks_url)
    for alg in ("ES256", "HS256", "none"):
        header = own_key.header(kid=kid, alg=alg)
        if alg == "ES256":
            token = own_key.token(header)
        elif alg == "HS256":
            token = hmac_signed(header, good_claims(), hmac_secret)
        else:
            token = f"{segment(header)}.{segment(good_claims())}."
        refused(verifier, token)
    # The entry is skipped, not fatal: the good key beside it still verifies.
    assert verifier.verify(own_key.token()).client_id == CLIENT_ID


def test_unreachable_jwks_is_unavailable_not_an_invalid_token(own_key: Key) -> None:
    # An outage says nothing of the token: callers that answer 401 to InvalidToken must not
    # answer 401 to this, or every client refetches its token at once.
    jwks = JwksServer([])
    url = jwks.jwks_url
    jwks.close()
    verifier = TokenVerifier(issuer=ISSUER, audience=API_AUDIENCE, jwks_url=url, timeout=2)
    with pytest.raises(VerificationUnavailable) as caught:
        verifier.verify(own_key.token())
    assert not isinstance(caught.value, InvalidToken)
    assert "unreachable" in caught.value.reason


# averify agrees with verify


ASYNC_SAMPLE: dict[str, Callable[[Key], Any]] = {
    "good": lambda key: key.token(),
    "customer": lambda key: key.token(
        scope=f"customer.{CUSTOMER_UUID}", customers=[{"id": CUSTOMER_UUID}]
    ),
    "alg-none": lambda key: f"{segment(key.header(alg='none'))}.{segment(good_claims())}.",
    "expired": lambda key: key.token(exp=int(time.time()) - 120),
    "foreign-aud": lambda key: key.token(aud=LINK_AUDIENCE),
    "list-aud": lambda key: key.token(aud=[API_AUDIENCE]),
    "wrong-typ": lambda key: key.token(key.header(typ="JWT")),
    "crit": lambda key: key.token(key.header(crit=["exp"])),
    "unknown-kid": lambda key: key.token(key.header(kid="nope")),
    "list-kid": lambda key: key.token(key.header(kid=["own-es256"])),
    "sub-mismatch": lambda key: key.token(sub="app_other"),
    "no-jti": lambda key: key.token(jti=MISSING),
    "too-long": lambda key: key.token(exp=int(time.time()) + MAX_TOKEN_LIFETIME + 1),
    "garbage": lambda key: "🙂.🙂.🙂",
    "huge": lambda key: "A" * 1_000_000,
    "nested": lambda key: signed(key.header(), nested_arrays(2_500), key.private),
}


def outcome(call: Callable[[], Any]) -> Any:
    try:
        token = call()
    except InvalidToken:
        return "InvalidToken"
    return (token.client_id, token.scope, token.customer_id)


@pytest.mark.parametrize("case", list(ASYNC_SAMPLE))
def test_averify_agrees_with_verify(own_key: Key, own_jwks: JwksServer, case: str) -> None:
    token = ASYNC_SAMPLE[case](own_key)
    sync = TokenVerifier(issuer=ISSUER, audience=API_AUDIENCE, jwks_url=own_jwks.jwks_url)
    asynchronous = TokenVerifier(issuer=ISSUER, audience=API_AUDIENCE, jwks_url=own_jwks.jwks_url)
    sync_outcome = outcome(lambda: sync.verify(token))
    async_outcome = outcome(lambda: asyncio.run(asynchronous.averify(token)))
    assert async_outcome == sync_outcome
    if case in ("good", "customer"):
        assert sync_outcome[0] == CLIENT_ID
    else:
        assert sync_outcome == "InvalidToken"


def test_averify_accepts_a_real_token(server: Server, api_token: str, app: AppCredentials) -> None:
    token = asyncio.run(server_verifier(server).averify(api_token))
    assert (token.client_id, token.scope) == (app.client_id, "api")
