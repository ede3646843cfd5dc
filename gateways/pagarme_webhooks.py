"""Pagar.me's webhook signature: `X-Webhook-Asymmetric-Signature: alg=RS256; kid=<key id>; signature=<base64url>`.

Pagar.me signs the raw body with RSA-SHA256 and publishes the public keys as a JWKS
(`https://hubapi.pagar.me/.well-known/jwks.json`); the key is chosen by `kid`. Unlike the sandbox's
HMAC, nothing secret is shared, so Renova only needs the JWKS address; a `kid` it has not seen makes
it fetch the keys again (at most once a minute), which is how a rotated key is picked up.
"""

from __future__ import annotations

import base64
import threading
import time
from typing import Any

import httpx
from cryptography.exceptions import InvalidSignature as CryptoInvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from gateways.webhooks import InvalidSignature

SIGNATURE_HEADER = "X-Webhook-Asymmetric-Signature"
KEYS_TTL_SECONDS = 3600.0
REFETCH_UNKNOWN_KID_SECONDS = 60.0
_MAX_HEADER_LENGTH = 4096


class KeysUnavailable(Exception):
    """The JWKS could not be fetched: the webhook can be neither accepted nor refused now (answer 503)."""


def basic_credentials(authorization: str | None) -> tuple[str, str] | None:
    """(user name, password) of a Basic `Authorization` header, or None when it is not one."""
    scheme, _, encoded = (authorization or "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    return user, password


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _int(text: str) -> int:
    return int.from_bytes(_b64url_decode(text), "big")


def parse_header(header: str | None) -> tuple[str, bytes]:
    """(kid, signature) of a signature header; InvalidSignature when it is not one."""
    if not header:
        raise InvalidSignature("missing signature header")
    if len(header) > _MAX_HEADER_LENGTH:
        raise InvalidSignature("malformed signature header: too long")
    fields: dict[str, str] = {}
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if not sep:
            raise InvalidSignature("malformed signature header: expected key=value pairs")
        fields[name.strip().lower()] = value.strip()
    if fields.get("alg") != "RS256":
        raise InvalidSignature("unsupported signature algorithm (RS256 expected)")
    kid, signature = fields.get("kid"), fields.get("signature")
    if not kid or not signature:
        raise InvalidSignature("malformed signature header: kid and signature are required")
    try:
        return kid, _b64url_decode(signature)
    except ValueError:
        raise InvalidSignature("malformed signature header: signature is not base64url") from None


def public_keys(jwks: Any) -> dict[str, rsa.RSAPublicKey]:
    """The RS256 signing keys of a JWKS document, by kid; other keys are skipped."""
    keys: dict[str, rsa.RSAPublicKey] = {}
    for key in jwks.get("keys", []) if isinstance(jwks, dict) else []:
        if not isinstance(key, dict) or key.get("kty") != "RSA" or key.get("use", "sig") != "sig":
            continue
        if key.get("alg", "RS256") != "RS256" or not key.get("kid"):
            continue
        try:
            keys[str(key["kid"])] = rsa.RSAPublicNumbers(_int(key["e"]), _int(key["n"])).public_key()
        except (KeyError, ValueError, TypeError):
            continue
    return keys


def verify(keys: dict[str, rsa.RSAPublicKey], header: str | None, body: bytes) -> None:
    """Return when `header` is a valid RS256 signature of the raw `body` by one of `keys`."""
    kid, signature = parse_header(header)
    key = keys.get(kid)
    if key is None:
        raise InvalidSignature(f"unknown signing key {kid!r}")
    try:
        key.verify(signature, body, padding.PKCS1v15(), hashes.SHA256())
    except CryptoInvalidSignature:
        raise InvalidSignature("signature mismatch") from None


class Jwks:
    """Pagar.me's public keys, fetched from `url` and kept an hour; thread-safe."""

    def __init__(self, url: str, *, timeout: float = 5.0) -> None:
        self.url = url
        self._timeout = timeout
        self._keys: dict[str, rsa.RSAPublicKey] = {}
        self._fetched_at = float("-inf")
        self._lock = threading.Lock()

    def verify(self, header: str | None, body: bytes) -> None:
        """Verify with the keys held, fetching them when stale or when the header names an unknown kid."""
        kid, _ = parse_header(header)
        now = time.monotonic()
        with self._lock:
            stale = now - self._fetched_at > KEYS_TTL_SECONDS
            unknown = kid not in self._keys and now - self._fetched_at > REFETCH_UNKNOWN_KID_SECONDS
            if stale or unknown:
                self._keys, self._fetched_at = self._fetch(), now
            keys = self._keys
        verify(keys, header, body)

    def _fetch(self) -> dict[str, rsa.RSAPublicKey]:
        try:
            response = httpx.get(self.url, timeout=self._timeout)
            response.raise_for_status()
            return public_keys(response.json())
        except (httpx.HTTPError, ValueError) as exc:
            raise KeysUnavailable(f"could not fetch Pagar.me's signing keys from {self.url}: {exc!r}") from exc


# --- the signing side (the emulator) ---------------------------------------------------------------------


def new_signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, str]:
    numbers = key.public_key().public_numbers()

    def encode(value: int) -> str:
        return _b64url_encode(value.to_bytes((value.bit_length() + 7) // 8, "big"))

    return {"kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid, "n": encode(numbers.n), "e": encode(numbers.e)}


def sign(key: rsa.RSAPrivateKey, kid: str, body: bytes) -> str:
    """The signature header value for `body`."""
    signature = key.sign(body, padding.PKCS1v15(), hashes.SHA256())
    return f"alg=RS256; kid={kid}; signature={_b64url_encode(signature)}"
