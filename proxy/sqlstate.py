"""Every SQLSTATE the proxy itself sends, in one place.

Owns: the codes and their meaning; the README's table is written from this
module. Errors that come from the upstream server are relayed untouched.

Must not: format messages or decide anything.
"""

from __future__ import annotations

from typing import Final

INVALID_PASSWORD: Final = "28P01"  # wrong password, or unknown user (indistinguishable)
NOT_AUTHORIZED: Final = "28000"  # user may not use this account / startup option refused
UNKNOWN_RESOURCE: Final = "3D000"  # dbname names no configured resource
UNKNOWN_ACCOUNT: Final = "3D000"  # RESOURCE/ACCOUNT names no account of that resource
TOO_MANY_CONNECTIONS: Final = "53300"  # max_client_connections reached
PROTOCOL_VIOLATION: Final = "08P01"  # malformed or unexpected protocol message
UPSTREAM_UNAVAILABLE: Final = "08001"  # cannot connect / authenticate to the upstream server
CONNECTION_FAILURE: Final = "08006"  # upstream connection lost mid-session
ADMIN_SHUTDOWN: Final = "57P01"  # proxy shutting down (drain timeout reached)
FEATURE_NOT_SUPPORTED: Final = "0A000"  # e.g. replication connections through the proxy
POLICY_DENIED: Final = "42501"  # a policy denies the statement
APPROVAL_REQUIRED: Final = "PV001"  # the statement needs approval (retry mode, or cannot be held)
APPROVAL_TIMEOUT: Final = "PV002"  # no decision within hold.wait_timeout; the request stays pending
APPROVAL_DENIED: Final = "PV003"  # a reviewer denied the request (the message carries the note)
APPROVAL_CLOSED: Final = "PV004"  # the request expired, was cancelled, or its approval lapsed
STORE_UNAVAILABLE: Final = "PV005"  # the approvals store cannot be used; nothing needing review runs
GRANT_ENDED: Final = "PV006"  # FATAL: a terminate_sessions grant ended (revoked or expired)
GRANT_REFUSED: Final = "PV007"  # pgvouch.request_access: the grant cannot be requested
HELD_INPUT_LIMIT: Final = "54000"  # too much pipelined behind a held statement
QUERY_CANCELED: Final = "57014"  # the client cancelled a held statement (Ctrl-C)
INTERNAL_ERROR: Final = "XX000"  # the proxy failed; the statement was NOT forwarded
# the admin console (dbname=pgvouch)
SYNTAX_ERROR: Final = "42601"  # a command the console does not know, or malformed
INSUFFICIENT_PRIVILEGE: Final = "42501"  # the workflow refuses this user (four-eyes, ...); RELOAD
UNDEFINED_OBJECT: Final = "42704"  # no such request
WRONG_OBJECT_TYPE: Final = "42809"  # REVOKE GRANT of a statement's request
WRONG_STATE: Final = "55000"  # the request's state does not allow it; approvals not configured
INVALID_PARAMETER_VALUE: Final = "22023"  # not a request id; a note too long or empty
CONFIG_FILE_ERROR: Final = "F0000"  # RELOAD: the policies did not load (the old ones stay)

DOCUMENTED: Final = {
    INVALID_PASSWORD: "Password authentication failed (wrong password or unknown user).",
    NOT_AUTHORIZED: "The user may not use the requested account, or sent a startup "
    "option the proxy refuses (role, session_authorization, replication); on the console, a "
    "change to a request under client_auth: trust.",
    UNKNOWN_RESOURCE: "The dbname names no configured resource, or RESOURCE/ACCOUNT "
    "names no account of that resource.",
    TOO_MANY_CONNECTIONS: "limits.max_client_connections is reached.",
    PROTOCOL_VIOLATION: "The client sent a malformed or unexpected protocol message; "
    "the connection is closed.",
    UPSTREAM_UNAVAILABLE: "The proxy could not connect or log in to the upstream server "
    "(timeout, refused, TLS or authentication failure).",
    CONNECTION_FAILURE: "The upstream connection was lost during the session.",
    ADMIN_SHUTDOWN: "The proxy is shutting down and the drain timeout ran out.",
    FEATURE_NOT_SUPPORTED: "Replication connections are not supported through the proxy; the "
    "console speaks only the simple query protocol.",
    POLICY_DENIED: "A policy denies the statement; the message names the policy. On the console: "
    "the workflow refuses this user (cannot_self_approve, not_eligible, not_requester, "
    "would_strand), or RELOAD by a user without the owner role.",
    APPROVAL_REQUIRED: "The statement needs approval: in retry mode the message carries the "
    "request id to re-send after approval; also when a hold is impossible (no reachable quorum).",
    APPROVAL_TIMEOUT: "Nobody decided within hold.wait_timeout; the request stays pending and "
    "the identical statement may be re-sent once it is approved.",
    APPROVAL_DENIED: "A reviewer denied the request; the message carries their note.",
    APPROVAL_CLOSED: "The request expired or was cancelled, or its approval lapsed.",
    STORE_UNAVAILABLE: "The approvals store is unavailable: statements that need review are "
    "not run (allowed statements keep flowing).",
    GRANT_ENDED: "FATAL: a JIT grant with terminate_sessions ended (revoked or expired), so "
    "the proxy closed the grant holder's sessions on that resource.",
    GRANT_REFUSED: "pgvouch.request_access: the grant cannot be requested (a policy denies a "
    "kind, nothing needs approval, the rule has no jit, or the duration exceeds its cap).",
    HELD_INPUT_LIMIT: "The client pipelined more than 1 MiB behind a held statement; "
    "the connection is closed.",
    QUERY_CANCELED: "The client cancelled a statement while it waited for approval.",
    INTERNAL_ERROR: "The proxy hit an internal error; the statement was not forwarded.",
    SYNTAX_ERROR: "Console: a command it does not know, or a malformed one (nothing in that "
    "Query string ran).",
    UNDEFINED_OBJECT: "Console: no request has that id.",
    WRONG_OBJECT_TYPE: "Console: REVOKE GRANT names a statement's request.",
    WRONG_STATE: "Console: the request's state does not allow it (already_reviewed, not_pending, "
    "expired, ...), or approvals or policies are not configured.",
    INVALID_PARAMETER_VALUE: "Console: not a request id, or a note that is empty (DENY) or too long.",
    CONFIG_FILE_ERROR: "Console RELOAD: the policies did not load; the previous ones stay in force.",
}
