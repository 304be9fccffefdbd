"""Bearer tokens for the REST API: minting, hashing, and checking them.

Owns: what an API token looks like (:func:`new_token`), the one hash the
config keeps of it (``users[].api_token_sha256``, :func:`token_hash`), and
mapping an ``Authorization: Bearer <token>`` header to a configured user
(:class:`TokenAuthenticator`).

Must not: store tokens in clear anywhere, log them, decide what a user may do
with a request (that is ``approvals.workflow``), or speak HTTP beyond reading
one header value.

Why a plain SHA-256 is enough: tokens are 256 random bits, so unlike
passwords they cannot be guessed from a dictionary and a slow KDF would add
nothing but latency to every call. Every check hashes the presented token
once and compares it with every configured hash using
:func:`hmac.compare_digest`, without stopping at the first match, so neither
the comparison nor the loop tells an attacker how close they came.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping

from config.settings import User

TOKEN_PREFIX = "pgv_"  # makes a leaked token recognizable to secret scanners
TOKEN_BYTES = 32
MAX_TOKEN_LENGTH = 512  # longer "tokens" are refused before hashing


def new_token() -> str:
    """A fresh random API token (shown once; only its hash is kept)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


def token_hash(token: str) -> str:
    """The value for ``users[].api_token_sha256``: lowercase hex SHA-256 of the token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` value, or None if there is none."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > MAX_TOKEN_LENGTH or " " in token:
        return None
    return token


class TokenAuthenticator:
    """Maps bearer tokens to the configured users that have an ``api_token_sha256``."""

    def __init__(self, users: Mapping[str, User]) -> None:
        self._hashes = [
            (user.api_token_sha256.encode("ascii"), user)
            for user in users.values()
            if user.api_token_sha256
        ]

    def authenticate(self, authorization: str | None) -> User | None:
        """The user whose token is in ``authorization`` (the header's value), or None."""
        token = bearer_token(authorization)
        if token is None:
            return None
        presented = token_hash(token).encode("ascii")
        found: User | None = None
        for stored, user in self._hashes:
            if hmac.compare_digest(presented, stored) and found is None:
                found = user
        return found
