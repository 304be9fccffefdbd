"""A small client of pgvouch's REST API for the command line tools (``pgvouch approval-mode``).

Owns: where the API is (``--api URL``, else ``$PGVOUCH_API``, else
``http://127.0.0.1:8432``), the caller's bearer token (only from
``$PGVOUCH_TOKEN``: a token on the command line would show in ``ps`` and
shell history), one JSON call, and turning the API's error shape
``{"error": {"code", "message"}}`` into :class:`ApiCallError`.

Must not: decide anything or know any endpoint's meaning; the server
checks who may do what. Never prints or logs the token.
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

API_ENV, TOKEN_ENV = "PGVOUCH_API", "PGVOUCH_TOKEN"
DEFAULT_API = "http://127.0.0.1:8432"
API_PREFIX = "/api/v1"


class ApiCallError(Exception):
    """The call failed: ``status`` 0 when the API could not be reached."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{message} ({code})" if code else message)
        self.status = status
        self.code = code
        self.message = message


class RestClient:
    def __init__(self, api: str, token: str, *, timeout: float = 30.0) -> None:
        base = api.rstrip("/")
        if not base.startswith(("http://", "https://")):
            raise ApiCallError(0, "bad_api_url", f"--api must be an http(s) URL, not {api!r}")
        self.base = base if base.endswith(API_PREFIX) else base + API_PREFIX
        self._token = token
        self.timeout = timeout

    def call(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        """The parsed JSON answer of ``method path`` (relative to /api/v1); ApiCallError on failure."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method)  # noqa: S310 (http(s) only)
        request.add_header("Authorization", f"Bearer {self._token}")
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310
                return _json(response.read())
        except urllib.error.HTTPError as exc:
            answer = _json(exc.read())
            error = answer.get("error") if isinstance(answer, dict) else None
            if isinstance(error, dict):
                raise ApiCallError(exc.code, str(error.get("code", "")),
                                   str(error.get("message", ""))) from None
            raise ApiCallError(exc.code, "", f"HTTP {exc.code} from {self.base}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ApiCallError(0, "unreachable", f"cannot reach the API at {self.base}: {reason}") from None


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw.strip() else None
    except ValueError:
        return None


def add_api_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api", metavar="URL", default=None,
                        help=f"the pgvouch API (default ${API_ENV} or {DEFAULT_API}); the token is "
                             f"read from ${TOKEN_ENV}")


def client_from(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> RestClient:
    """The client for ``--api`` and ``$PGVOUCH_TOKEN``; ApiCallError if there is no token."""
    token = environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise ApiCallError(0, "no_token", f"set {TOKEN_ENV} to your API token (pgvouch user token NAME)")
    return RestClient(args.api or environ.get(API_ENV) or DEFAULT_API, token)
