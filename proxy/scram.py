"""SCRAM-SHA-256 (RFC 5802 / RFC 7677) for both ends, and md5 for upstreams.

Owns: the server side of SCRAM (checking a client against a stored
verifier, never a password), the client side (logging in upstream), the
verifier format PostgreSQL uses (``SCRAM-SHA-256$iter:salt$stored:server``)
and PostgreSQL's md5 password hashing.

Must not: do I/O or log anything. Each step is a plain method taking and
returning bytes, so the exchanges are tested without a server. Every secret
comparison is constant-time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import stringprep
import unicodedata
from dataclasses import dataclass

MECHANISM = "SCRAM-SHA-256"
DEFAULT_ITERATIONS = 4096
# An upstream could make the proxy spin on PBKDF2; PostgreSQL's default is 4096.
MAX_UPSTREAM_ITERATIONS = 1_000_000


class ScramError(Exception):
    """The exchange failed; the message is safe to log (it holds no secret)."""


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (ValueError, TypeError):
        raise ScramError("invalid base64 in SCRAM message") from None


def saslprep(password: str) -> str:
    """SASLprep (RFC 4013) as PostgreSQL applies it: on prohibited input, use the raw text."""
    mapped = "".join(
        " " if stringprep.in_table_c12(ch) else ch
        for ch in password
        if not stringprep.in_table_b1(ch)
    )
    normalized = unicodedata.normalize("NFKC", mapped)
    if not normalized:
        return password
    # RFC 3454 section 6: right-to-left text must not mix with left-to-right
    # text, and must start and end with a right-to-left character.
    if any(stringprep.in_table_d1(ch) for ch in normalized) and (
        any(stringprep.in_table_d2(ch) for ch in normalized)
        or not stringprep.in_table_d1(normalized[0])
        or not stringprep.in_table_d1(normalized[-1])
    ):
        return password
    for ch in normalized:
        if (
            stringprep.in_table_c12(ch) or stringprep.in_table_c21_c22(ch)
            or stringprep.in_table_c3(ch) or stringprep.in_table_c4(ch)
            or stringprep.in_table_c5(ch) or stringprep.in_table_c6(ch)
            or stringprep.in_table_c7(ch) or stringprep.in_table_c8(ch)
            or stringprep.in_table_c9(ch) or stringprep.in_table_a1(ch)
        ):
            return password
    return normalized


def _salted(password: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", saslprep(password).encode("utf-8"), salt, iterations)


@dataclass(frozen=True)
class Verifier:
    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes

    def __repr__(self) -> str:  # never print key material
        return f"Verifier(iterations={self.iterations})"

    def encode(self) -> str:
        return (
            f"{MECHANISM}${self.iterations}:{_b64(self.salt)}"
            f"${_b64(self.stored_key)}:{_b64(self.server_key)}"
        )


def make_verifier(password: str, *, iterations: int = DEFAULT_ITERATIONS,
                  salt: bytes | None = None) -> Verifier:
    salt = salt if salt is not None else secrets.token_bytes(16)
    salted = _salted(password, salt, iterations)
    return Verifier(
        iterations,
        salt,
        _h(_hmac(salted, b"Client Key")),
        _hmac(salted, b"Server Key"),
    )


def parse_verifier(text: str) -> Verifier:
    try:
        mech, params, keys = text.split("$")
        iterations_s, salt_s = params.split(":")
        stored_s, server_s = keys.split(":")
        iterations = int(iterations_s)
    except ValueError:
        raise ScramError("malformed SCRAM verifier") from None
    if mech != MECHANISM or iterations < 1:
        raise ScramError("malformed SCRAM verifier")
    stored, server = _unb64(stored_s), _unb64(server_s)
    if len(stored) != 32 or len(server) != 32:
        raise ScramError("malformed SCRAM verifier")
    return Verifier(iterations, _unb64(salt_s), stored, server)


def mock_verifier(username: str, server_secret: bytes) -> Verifier:
    """A stable fake verifier for unknown users, so they look like known ones."""
    salt = _hmac(server_secret, b"salt:" + username.encode("utf-8"))[:16]
    key = _hmac(server_secret, b"key:" + username.encode("utf-8"))
    return Verifier(DEFAULT_ITERATIONS, salt, key, key)


def _attributes(message: str) -> dict[str, str]:
    attrs: dict[str, str] = {}
    for part in message.split(","):
        if len(part) < 2 or part[1] != "=":
            raise ScramError("malformed SCRAM attribute")
        attrs.setdefault(part[0], part[2:])
    return attrs


class ScramServer:
    """Server side of one exchange: ``first()`` then ``final()``.

    ``final`` raises :class:`ScramError` for a wrong password. A mock exchange
    (unknown user) always fails at ``final``, after the same work.
    """

    def __init__(self, verifier: Verifier, *, mock: bool = False) -> None:
        self._verifier = verifier
        self._mock = mock
        self._nonce = ""
        self._gs2 = ""
        self._auth_prefix = ""

    def first(self, client_first: bytes) -> bytes:
        try:
            text = client_first.decode("utf-8")
        except UnicodeDecodeError:
            raise ScramError("client-first-message is not UTF-8") from None
        flag, _, rest = text.partition(",")
        authzid, _, bare = rest.partition(",")
        if flag.startswith("p="):
            raise ScramError("channel binding was requested but is not offered")
        if flag not in ("n", "y") or authzid:
            # like PostgreSQL: no authorization identity (the startup user is the identity)
            raise ScramError("malformed GS2 header")
        attrs = _attributes(bare)
        client_nonce = attrs.get("r", "")
        if not client_nonce or "m" in attrs:
            raise ScramError("malformed client-first-message")
        self._gs2 = f"{flag},{authzid},"
        self._nonce = client_nonce + _b64(secrets.token_bytes(18))
        server_first = (
            f"r={self._nonce},s={_b64(self._verifier.salt)},i={self._verifier.iterations}"
        )
        self._auth_prefix = f"{bare},{server_first}"
        return server_first.encode("ascii")

    def final(self, client_final: bytes) -> bytes:
        try:
            text = client_final.decode("utf-8")
        except UnicodeDecodeError:
            raise ScramError("client-final-message is not UTF-8") from None
        without_proof, sep, proof_s = text.rpartition(",p=")
        if not sep:
            raise ScramError("client-final-message has no proof")
        attrs = _attributes(without_proof)
        if attrs.get("c") != _b64(self._gs2.encode("utf-8")):
            raise ScramError("channel binding data does not match")
        if not hmac.compare_digest(attrs.get("r", "").encode(), self._nonce.encode()):
            raise ScramError("nonce mismatch")
        proof = _unb64(proof_s)
        auth_message = f"{self._auth_prefix},{without_proof}".encode()
        signature = _hmac(self._verifier.stored_key, auth_message)
        if len(proof) != len(signature):
            raise ScramError("password authentication failed")
        client_key = _xor(proof, signature)
        ok = hmac.compare_digest(_h(client_key), self._verifier.stored_key)
        if self._mock or not ok:
            raise ScramError("password authentication failed")
        return f"v={_b64(_hmac(self._verifier.server_key, auth_message))}".encode("ascii")


class ScramClient:
    """Client side of one exchange, for logging in to an upstream server."""

    def __init__(self, password: str, *, nonce: str | None = None) -> None:
        self._password = password
        self._nonce = nonce or _b64(secrets.token_bytes(18))
        self._bare = f"n=,r={self._nonce}"
        self._server_signature = b""

    def first(self) -> bytes:
        return f"n,,{self._bare}".encode("ascii")

    def final(self, server_first: bytes) -> bytes:
        text = server_first.decode("utf-8", "replace")
        attrs = _attributes(text)
        nonce, salt_s, iter_s = attrs.get("r", ""), attrs.get("s", ""), attrs.get("i", "")
        if not nonce.startswith(self._nonce) or len(nonce) == len(self._nonce):
            raise ScramError("upstream sent an invalid SCRAM nonce")
        try:
            iterations = int(iter_s)
        except ValueError:
            raise ScramError("upstream sent an invalid iteration count") from None
        if iterations < 1 or iterations > MAX_UPSTREAM_ITERATIONS:
            raise ScramError(f"upstream sent an unacceptable iteration count ({iterations})")
        salted = _salted(self._password, _unb64(salt_s), iterations)
        client_key = _hmac(salted, b"Client Key")
        without_proof = f"c={_b64(b'n,,')},r={nonce}"
        auth_message = f"{self._bare},{text},{without_proof}".encode()
        proof = _xor(client_key, _hmac(_h(client_key), auth_message))
        self._server_signature = _hmac(_hmac(salted, b"Server Key"), auth_message)
        return f"{without_proof},p={_b64(proof)}".encode("ascii")

    def verify(self, server_final: bytes) -> None:
        attrs = _attributes(server_final.decode("utf-8", "replace"))
        if "e" in attrs:
            raise ScramError(f"upstream rejected SCRAM: {attrs['e']}")
        expected = _b64(self._server_signature).encode("ascii")
        if not hmac.compare_digest(attrs.get("v", "").encode("ascii", "replace"), expected):
            raise ScramError("upstream server signature does not verify")


def md5_password(user: str, password: str, salt: bytes) -> bytes:
    """PostgreSQL's ``md5`` response: md5(md5(password + user) + salt), hex, prefixed."""
    inner = hashlib.md5(password.encode() + user.encode(), usedforsecurity=False).hexdigest()
    outer = hashlib.md5(inner.encode() + salt, usedforsecurity=False).hexdigest()
    return b"md5" + outer.encode("ascii")
