"""FAL webhook signatures: ED25519 over request id, user id, timestamp and the body's SHA-256.

Pure functions, no I/O. The message signed is, as fal documents it::

    "\\n".join([request_id, user_id, timestamp, sha256(raw_body).hexdigest()]).encode()

and the public keys come as OKP/Ed25519 JWKs (``x`` = unpadded base64url of the raw key).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from trainguard.errors import WebhookRejected

HEADER_REQUEST_ID = "X-Fal-Webhook-Request-Id"
HEADER_USER_ID = "X-Fal-Webhook-User-Id"
HEADER_TIMESTAMP = "X-Fal-Webhook-Timestamp"
HEADER_SIGNATURE = "X-Fal-Webhook-Signature"
REQUIRED_HEADERS: tuple[str, ...] = (
    HEADER_REQUEST_ID,
    HEADER_USER_ID,
    HEADER_TIMESTAMP,
    HEADER_SIGNATURE,
)
DEFAULT_TOLERANCE_SECONDS = 300.0


def _b64url_encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    padded = text + "=" * (-len(text) % 4)
    return base64.b64decode(padded, altchars=b"-_", validate=True)


def public_jwk(public_key: Ed25519PublicKey, kid: str | None = None) -> dict[str, str]:
    """The OKP/Ed25519 JWK of a public key; ``kid`` defaults to a thumbprint of the key."""
    raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": _b64url_encode(raw),
        "kid": kid or hashlib.sha256(raw).hexdigest()[:16],
    }


def generate_keypair(kid: str | None = None) -> tuple[Ed25519PrivateKey, dict[str, str]]:
    """A fresh signing key and the JWK that publishes its public half."""
    private_key = Ed25519PrivateKey.generate()
    return private_key, public_jwk(private_key.public_key(), kid)


def jwks_document(jwks: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The JSON document served at ``/.well-known/jwks.json``."""
    return {"keys": list(jwks)}


def parse_jwks(doc: dict[str, Any]) -> list[Ed25519PublicKey]:
    """The Ed25519 public keys of a JWKS document; other key types are skipped.

    Raises ValueError when the document is malformed, an Ed25519 key cannot be decoded, or
    no Ed25519 key is left (an empty set would reject every webhook, so the caller should
    keep its previous keys instead).
    """
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError("JWKS document must be a JSON object with a 'keys' list")
    keys: list[Ed25519PublicKey] = []
    for index, jwk in enumerate(doc["keys"]):
        if not isinstance(jwk, dict):
            raise ValueError(f"JWKS key #{index} is not a JSON object")
        if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
            continue
        x = jwk.get("x")
        if not isinstance(x, str):
            raise ValueError(f"JWKS key #{index} (Ed25519) has no string 'x'")
        try:
            keys.append(Ed25519PublicKey.from_public_bytes(_b64url_decode(x)))
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"JWKS key #{index} (Ed25519) has an undecodable 'x': {exc}") from exc
    if not keys:
        raise ValueError("JWKS document holds no OKP/Ed25519 key")
    return keys


def signed_message(request_id: str, user_id: str, timestamp: str, body: bytes) -> bytes:
    """The exact bytes fal signs for a webhook."""
    return _message(request_id, user_id, timestamp, hashlib.sha256(body).hexdigest())


def _message(request_id: str, user_id: str, timestamp: str, body_sha256: str) -> bytes:
    return "\n".join([request_id, user_id, timestamp, body_sha256]).encode("utf-8")


def sign_webhook(
    private_key: Ed25519PrivateKey, request_id: str, user_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    """The four ``X-Fal-Webhook-*`` headers for ``body`` (signature in hex)."""
    message = signed_message(request_id, user_id, str(timestamp), body)
    return {
        HEADER_REQUEST_ID: request_id,
        HEADER_USER_ID: user_id,
        HEADER_TIMESTAMP: str(timestamp),
        HEADER_SIGNATURE: private_key.sign(message).hex(),
    }


@dataclass(frozen=True)
class Envelope:
    """The four ``X-Fal-Webhook-*`` header values of a webhook whose envelope was checked:
    all present, the timestamp an integer within the tolerance of its arrival."""

    request_id: str
    user_id: str
    timestamp: str
    signature: str


def check_envelope(
    headers: Mapping[str, str],
    now: float,
    tolerance: float = DEFAULT_TOLERANCE_SECONDS,
) -> Envelope:
    """The checks that need no key: the four headers present, the timestamp an integer
    within ``tolerance`` seconds of ``now`` (either direction). Header names match in any
    casing. Raises WebhookRejected (missing_header, stale)."""
    lowered = {name.lower(): value for name, value in headers.items()}
    values: list[str] = []
    for name in REQUIRED_HEADERS:
        value = lowered.get(name.lower())
        if not value:
            raise WebhookRejected(f"header {name} is missing or empty", "missing_header")
        values.append(value)
    envelope = Envelope(*values)

    raw_timestamp = envelope.timestamp
    if not (raw_timestamp.isascii() and raw_timestamp.isdigit()) or len(raw_timestamp) > 12:
        raise WebhookRejected(
            f"timestamp {raw_timestamp[:40]!r} is not a Unix time in seconds", "stale"
        )
    timestamp = int(raw_timestamp)
    if abs(now - timestamp) > tolerance:
        raise WebhookRejected(
            f"timestamp {timestamp} is {now - timestamp:+.0f} s from now (limit {tolerance:g} s)",
            "stale",
        )
    return envelope


def verify_signature(
    envelope: Envelope, body_sha256: str, keys: Sequence[Ed25519PublicKey]
) -> None:
    """Return when some key verifies the signature of a checked envelope over a body of
    digest ``body_sha256`` (hex), else raise WebhookRejected (bad_signature)."""
    try:
        signature = bytes.fromhex(envelope.signature)
    except ValueError:
        raise WebhookRejected("signature is not hex", "bad_signature") from None
    message = _message(envelope.request_id, envelope.user_id, envelope.timestamp, body_sha256)
    for key in keys:
        try:
            key.verify(signature, message)
        except InvalidSignature:
            continue
        return
    raise WebhookRejected(f"no key of {len(keys)} verifies the signature", "bad_signature")


def check_user_id(user_id: str | None, allowed: Sequence[str]) -> None:
    """Raise WebhookRejected (foreign_user) when ``allowed`` is not empty and ``user_id`` (the
    ``X-Fal-Webhook-User-Id``) is not in it. fal signs every customer's webhooks with the same
    keys, so only this header says whose they are: call it only once the signature
    verified, so that an unsigned request learns nothing of the list."""
    if allowed and user_id not in allowed:
        raise WebhookRejected("the fal user id is not an allowed one", "foreign_user")


def check_user(headers: Mapping[str, str], allowed: Sequence[str]) -> None:
    """``check_user_id`` of the ``X-Fal-Webhook-User-Id`` among ``headers`` (any casing)."""
    if not allowed:
        return
    lowered = {name.lower(): value for name, value in headers.items()}
    check_user_id(lowered.get(HEADER_USER_ID.lower()), allowed)


def verify_webhook(
    headers: Mapping[str, str],
    body: bytes,
    keys: Sequence[Ed25519PublicKey],
    now: float,
    tolerance: float = DEFAULT_TOLERANCE_SECONDS,
) -> None:
    """Return when some key verifies the webhook, else raise WebhookRejected.

    Header names match in any casing. Checks run in order: headers present, timestamp
    an integer within ``tolerance`` seconds of ``now`` (either direction), signature.
    """
    envelope = check_envelope(headers, now, tolerance)
    verify_signature(envelope, hashlib.sha256(body).hexdigest(), keys)
