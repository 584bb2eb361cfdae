"""FAL webhook signing and verification (daemon.signing)."""

from __future__ import annotations

import base64
import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from trainguard import signing
from trainguard.signing import WebhookRejected

NOW = 1_700_000_000
BODY = b'{"request_id": "r-1", "status": "OK", "payload": {"finetune_id": "f"}}'


@pytest.fixture(scope="module")
def keypair() -> tuple[Ed25519PrivateKey, dict[str, str]]:
    return signing.generate_keypair()


def _keys(jwk: dict[str, str]) -> list:
    return signing.parse_jwks(signing.jwks_document([jwk]))


def _reject_code(headers: dict[str, str], body: bytes, keys: list, now: float = NOW) -> str:
    with pytest.raises(WebhookRejected) as caught:
        signing.verify_webhook(headers, body, keys, now=now)
    return caught.value.code


def test_round_trip_and_message_layout(keypair: tuple[Ed25519PrivateKey, dict]) -> None:
    private_key, jwk = keypair
    headers = signing.sign_webhook(private_key, "r-1", "u-9", NOW, BODY)
    assert set(headers) == set(signing.REQUIRED_HEADERS)
    assert headers["X-Fal-Webhook-Timestamp"] == str(NOW)
    message = "\n".join(["r-1", "u-9", str(NOW), hashlib.sha256(BODY).hexdigest()]).encode()
    # The signature is over fal's documented message, checked with the raw public key.
    private_key.public_key().verify(bytes.fromhex(headers["X-Fal-Webhook-Signature"]), message)
    signing.verify_webhook(headers, BODY, _keys(jwk), now=NOW)


def test_jwk_shape(keypair: tuple[Ed25519PrivateKey, dict]) -> None:
    _, jwk = keypair
    assert jwk["kty"] == "OKP" and jwk["crv"] == "Ed25519" and jwk["kid"]
    assert "=" not in jwk["x"]
    assert len(base64.urlsafe_b64decode(jwk["x"] + "=")) == 32
    assert signing.jwks_document([jwk]) == {"keys": [jwk]}


def test_any_header_casing_is_accepted(keypair: tuple[Ed25519PrivateKey, dict]) -> None:
    private_key, jwk = keypair
    headers = signing.sign_webhook(private_key, "r-1", "u-9", NOW, BODY)
    signing.verify_webhook({k.lower(): v for k, v in headers.items()}, BODY, _keys(jwk), now=NOW)
    signing.verify_webhook({k.upper(): v for k, v in headers.items()}, BODY, _keys(jwk), now=NOW)


def test_one_flipped_body_byte_fails(keypair: tuple[Ed25519PrivateKey, dict]) -> None:
    private_key, jwk = keypair
    headers = signing.sign_webhook(private_key, "r-1", "u-9", NOW, BODY)
    flipped = bytearray(BODY)
    flipped[10] ^= 0x01
    assert _reject_code(headers, bytes(flipped), _keys(jwk)) == "bad_signature"


@pytest.mark.parametrize("missing", signing.REQUIRED_HEADERS)
def test_each_missing_header(keypair: tuple[Ed25519PrivateKey, dict], missing: str) -> None:
    private_key, jwk = keypair
    headers = signing.sign_webhook(private_key, "r-1", "u-9", NOW, BODY)
    del headers[missing]
    with pytest.raises(WebhookRejected) as caught:
        signing.verify_webhook(headers, BODY, _keys(jwk), now=NOW)
    assert caught.value.code == "missing_header"
    assert missing in caught.value.reason


@pytest.mark.parametrize(
    ("offset", "code"),
    [(-301, "stale"), (301, "stale"), (-300, None), (300, None), (0, None)],
)
def test_timestamp_window(
    keypair: tuple[Ed25519PrivateKey, dict], offset: int, code: str | None
) -> None:
    private_key, jwk = keypair
    headers = signing.sign_webhook(private_key, "r-1", "u-9", NOW + offset, BODY)
    if code is None:
        signing.verify_webhook(headers, BODY, _keys(jwk), now=NOW)
    else:
        assert _reject_code(headers, BODY, _keys(jwk)) == code


@pytest.mark.parametrize(
    "timestamp", ["1700000000.5", "soon", "１７００００００００", "1_700_000_000"]
)
def test_non_integer_timestamp_is_stale(
    keypair: tuple[Ed25519PrivateKey, dict], timestamp: str
) -> None:
    private_key, jwk = keypair
    headers = signing.sign_webhook(private_key, "r-1", "u-9", NOW, BODY)
    headers["X-Fal-Webhook-Timestamp"] = timestamp
    assert _reject_code(headers, BODY, _keys(jwk)) == "stale"


def test_checks_run_headers_then_timestamp_then_signature(
    keypair: tuple[Ed25519PrivateKey, dict],
) -> None:
    private_key, jwk = keypair
    headers = signing.sign_webhook(private_key, "r-1", "u-9", NOW - 1000, BODY)
    headers["X-Fal-Webhook-Signature"] = "not hex"
    assert _reject_code(headers, BODY, _keys(jwk)) == "stale"
    del headers["X-Fal-Webhook-User-Id"]
    assert _reject_code(headers, BODY, _keys(jwk)) == "missing_header"


def test_signature_not_hex(keypair: tuple[Ed25519PrivateKey, dict]) -> None:
    private_key, jwk = keypair
    headers = signing.sign_webhook(private_key, "r-1", "u-9", NOW, BODY)
    headers["X-Fal-Webhook-Signature"] = "zz" + headers["X-Fal-Webhook-Signature"][2:]
    assert _reject_code(headers, BODY, _keys(jwk)) == "bad_signature"


def test_signed_fields_are_bound(keypair: tuple[Ed25519PrivateKey, dict]) -> None:
    private_key, jwk = keypair
    for name, value in [
        ("X-Fal-Webhook-Request-Id", "r-2"),
        ("X-Fal-Webhook-User-Id", "u-8"),
        ("X-Fal-Webhook-Timestamp", str(NOW + 1)),
    ]:
        headers = signing.sign_webhook(private_key, "r-1", "u-9", NOW, BODY)
        headers[name] = value
        assert _reject_code(headers, BODY, _keys(jwk)) == "bad_signature", name


def test_key_set_where_only_the_second_key_verifies(
    keypair: tuple[Ed25519PrivateKey, dict],
) -> None:
    private_key, jwk = keypair
    _, other_jwk = signing.generate_keypair(kid="old")
    rsa_like = {"kty": "RSA", "n": "abc", "e": "AQAB", "kid": "rsa"}
    keys = signing.parse_jwks(signing.jwks_document([other_jwk, rsa_like, jwk]))
    assert len(keys) == 2  # the RSA key is skipped
    headers = signing.sign_webhook(private_key, "r-1", "u-9", NOW, BODY)
    signing.verify_webhook(headers, BODY, keys, now=NOW)
    assert _reject_code(headers, BODY, keys[:1]) == "bad_signature"
    assert _reject_code(headers, BODY, []) == "bad_signature"


def test_parse_jwks_adds_padding(keypair: tuple[Ed25519PrivateKey, dict]) -> None:
    private_key, jwk = keypair
    # 32 bytes encode to 43 base64 characters: decoding needs one "=" added back.
    assert len(jwk["x"]) == 43
    padded = dict(jwk, x=jwk["x"] + "=")
    for doc in ({"keys": [jwk]}, {"keys": [padded]}):
        (key,) = signing.parse_jwks(doc)
        message = b"m"
        key.verify(private_key.sign(message), message)


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ([], "'keys' list"),
        ({"keys": "nope"}, "'keys' list"),
        ({}, "'keys' list"),
        ({"keys": ["x"]}, "not a JSON object"),
        ({"keys": [{"kty": "OKP", "crv": "Ed25519"}]}, "no string 'x'"),
        ({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "!!!notbase64"}]}, "undecodable"),
        ({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "AAAA"}]}, "undecodable"),
        ({"keys": [{"kty": "OKP", "crv": "X25519", "x": "AAAA"}]}, "no OKP/Ed25519"),
        ({"keys": []}, "no OKP/Ed25519"),
    ],
)
def test_parse_jwks_garbage(doc: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        signing.parse_jwks(doc)  # type: ignore[arg-type]


_PRIVATE, _JWK = signing.generate_keypair()
_KEYS = signing.parse_jwks({"keys": [_JWK]})


@given(body=st.binary(min_size=1, max_size=512), data=st.data())
def test_any_body_change_breaks_verification(body: bytes, data: st.DataObject) -> None:
    headers = signing.sign_webhook(_PRIVATE, "r-1", "u-9", NOW, body)
    signing.verify_webhook(headers, body, _KEYS, now=NOW)
    index = data.draw(st.integers(0, len(body) - 1), label="index")
    flipped = bytearray(body)
    flipped[index] ^= data.draw(st.integers(1, 255), label="mask")
    changes = [
        bytes(flipped),
        body + data.draw(st.binary(min_size=1, max_size=8), label="appended"),
        body[:index],
        data.draw(st.binary(max_size=512).filter(lambda other: other != body), label="other"),
    ]
    for changed in changes:
        with pytest.raises(WebhookRejected) as caught:
            signing.verify_webhook(headers, changed, _KEYS, now=NOW)
        assert caught.value.code == "bad_signature"


def test_a_signature_over_the_gateway_id_binds_the_gateway_id(
    keypair: tuple[Ed25519PrivateKey, dict],
) -> None:
    """After fal retried a request its header may carry the gateway id: the signature is
    then over that id, and verifies with it and with nothing else."""
    private_key, jwk = keypair
    headers = signing.sign_webhook(private_key, "gw-7", "u-9", NOW, BODY)
    signing.verify_webhook(headers, BODY, _keys(jwk), now=NOW)  # as sent: genuine
    swapped = {**headers, signing.HEADER_REQUEST_ID: "r-1"}  # the body's request_id instead
    assert _reject_code(swapped, BODY, _keys(jwk)) == "bad_signature"


def test_check_user_refuses_only_ids_outside_a_non_empty_list() -> None:
    headers = {"x-fal-webhook-user-id": "acct-1"}
    signing.check_user(headers, [])  # empty: any account
    signing.check_user(headers, ["acct-0", "acct-1"])
    signing.check_user({signing.HEADER_USER_ID: "acct-1"}, ["acct-1"])  # any casing
    for seen in ({"x-fal-webhook-user-id": "acct-2"}, {}):
        with pytest.raises(WebhookRejected) as caught:
            signing.check_user(seen, ["acct-1"])
        assert caught.value.code == "foreign_user"
        assert "acct-1" not in str(caught.value)  # the refusal does not name the allowed ids
