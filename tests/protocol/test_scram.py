"""SCRAM-SHA-256 both ways, PostgreSQL's verifier format, and md5.

The reference values come from RFC 7677's example exchange (user "user",
password "pencil") and from a small independent SCRAM implementation below,
written straight from RFC 5802 with hashlib, which is itself checked against
the RFC's example first.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import scram
from proxy.scram import ScramClient, ScramError, ScramServer

# RFC 7677, section 3
RFC_PASSWORD = "pencil"
RFC_CLIENT_NONCE = "rOprNGfwEbeRWgbNEkqO"
RFC_NONCE = "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_SALT = "W22ZaJ0SNY7soEsUEjb6gQ=="
RFC_CLIENT_FIRST_BARE = f"n=user,r={RFC_CLIENT_NONCE}"
RFC_SERVER_FIRST = f"r={RFC_NONCE},s={RFC_SALT},i=4096"
RFC_FINAL_WITHOUT_PROOF = f"c=biws,r={RFC_NONCE}"
RFC_PROOF = "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
RFC_SERVER_SIGNATURE = "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
# The same password and salt as PostgreSQL stores it in pg_authid.rolpassword
RFC_VERIFIER = (
    "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ=="
    "$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU="
)

ITER = 64  # cheap iterations for tests that do not need the RFC's 4096


# --------------------------------------------------------------------------
# an independent reference implementation (RFC 5802, section 3)
# --------------------------------------------------------------------------
def ref_hmac(key: bytes, data: str | bytes) -> bytes:
    return hmac.new(key, data.encode() if isinstance(data, str) else data, hashlib.sha256).digest()


def ref_keys(password: str, salt: bytes, iterations: int) -> tuple[bytes, bytes, bytes]:
    """(ClientKey, StoredKey, ServerKey)."""
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = ref_hmac(salted, "Client Key")
    return client_key, hashlib.sha256(client_key).digest(), ref_hmac(salted, "Server Key")


def ref_proof_and_signature(password: str, salt: bytes, iterations: int,
                            auth_message: str) -> tuple[str, str]:
    client_key, stored_key, server_key = ref_keys(password, salt, iterations)
    signature = ref_hmac(stored_key, auth_message)
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    return (base64.b64encode(proof).decode(),
            base64.b64encode(ref_hmac(server_key, auth_message)).decode())


def attrs(message: bytes) -> dict[str, str]:
    return {part[0]: part[2:] for part in message.decode().split(",")}


def exchange(password: str, verifier: scram.Verifier, *, mock: bool = False) -> bytes:
    client = ScramClient(password)
    server = ScramServer(verifier, mock=mock)
    final = server.final(client.final(server.first(client.first())))
    client.verify(final)
    return final


# --------------------------------------------------------------------------
# RFC 7677 test vector
# --------------------------------------------------------------------------
def test_reference_implementation_matches_rfc7677() -> None:
    auth = f"{RFC_CLIENT_FIRST_BARE},{RFC_SERVER_FIRST},{RFC_FINAL_WITHOUT_PROOF}"
    salt = base64.b64decode(RFC_SALT)
    assert ref_proof_and_signature(RFC_PASSWORD, salt, 4096, auth) == (
        RFC_PROOF, RFC_SERVER_SIGNATURE,
    )


def test_make_verifier_matches_rfc7677_keys() -> None:
    verifier = scram.make_verifier(RFC_PASSWORD, salt=base64.b64decode(RFC_SALT), iterations=4096)
    assert verifier.encode() == RFC_VERIFIER
    # The server's check, done with the module's primitives on the RFC's messages:
    # H(ClientProof XOR HMAC(StoredKey, AuthMessage)) == StoredKey, and
    # ServerSignature == HMAC(ServerKey, AuthMessage).
    auth = f"{RFC_CLIENT_FIRST_BARE},{RFC_SERVER_FIRST},{RFC_FINAL_WITHOUT_PROOF}".encode()
    client_key = bytes(
        a ^ b for a, b in zip(base64.b64decode(RFC_PROOF),
                              scram._hmac(verifier.stored_key, auth), strict=True)
    )
    assert scram._h(client_key) == verifier.stored_key
    assert scram._b64(scram._hmac(verifier.server_key, auth)) == RFC_SERVER_SIGNATURE


def test_server_accepts_the_rfc7677_client_with_a_fixed_server_nonce(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    nonce_bytes = bytes(range(18))
    monkeypatch.setattr(scram.secrets, "token_bytes", lambda n: nonce_bytes[:n])
    server = ScramServer(scram.parse_verifier(RFC_VERIFIER))
    server_first = server.first(f"n,,{RFC_CLIENT_FIRST_BARE}".encode()).decode()
    nonce = RFC_CLIENT_NONCE + base64.b64encode(nonce_bytes).decode()
    assert server_first == f"r={nonce},s={RFC_SALT},i=4096"
    without_proof = f"c=biws,r={nonce}"
    proof, signature = ref_proof_and_signature(
        RFC_PASSWORD, base64.b64decode(RFC_SALT), 4096,
        f"{RFC_CLIENT_FIRST_BARE},{server_first},{without_proof}",
    )
    final = server.final(f"{without_proof},p={proof}".encode())
    assert final == f"v={signature}".encode()


def test_client_against_the_rfc7677_server_first() -> None:
    # libpq and pgvouch send an empty user name (n=): PostgreSQL takes the user
    # from the startup packet. So the proof differs from the RFC's, which used n=user.
    client = ScramClient(RFC_PASSWORD, nonce=RFC_CLIENT_NONCE)
    assert client.first() == f"n,,n=,r={RFC_CLIENT_NONCE}".encode()
    final = client.final(RFC_SERVER_FIRST.encode())
    proof, signature = ref_proof_and_signature(
        RFC_PASSWORD, base64.b64decode(RFC_SALT), 4096,
        f"n=,r={RFC_CLIENT_NONCE},{RFC_SERVER_FIRST},{RFC_FINAL_WITHOUT_PROOF}",
    )
    assert final == f"{RFC_FINAL_WITHOUT_PROOF},p={proof}".encode()
    client.verify(f"v={signature}".encode())
    with pytest.raises(ScramError):
        client.verify(f"v={RFC_SERVER_SIGNATURE}".encode())


# --------------------------------------------------------------------------
# full exchanges
# --------------------------------------------------------------------------
def test_full_exchange_succeeds() -> None:
    final = exchange("s3cret", scram.make_verifier("s3cret", iterations=ITER))
    assert final.startswith(b"v=")


def test_full_exchange_with_default_iterations() -> None:
    verifier = scram.make_verifier("s3cret")
    assert verifier.iterations == scram.DEFAULT_ITERATIONS == 4096
    exchange("s3cret", verifier)


@settings(max_examples=25, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs",)), max_size=20))
def test_full_exchange_any_password(password: str) -> None:
    exchange(password, scram.make_verifier(password, iterations=2))


def test_wrong_password_fails() -> None:
    with pytest.raises(ScramError, match="password authentication failed"):
        exchange("wrong", scram.make_verifier("right", iterations=ITER))


def test_mock_exchange_always_fails_even_with_its_own_keys() -> None:
    verifier = scram.mock_verifier("nobody", b"k" * 32)
    with pytest.raises(ScramError, match="password authentication failed"):
        exchange("anything", verifier, mock=True)
    # a real verifier with mock=True (the "unknown user" path) also fails
    with pytest.raises(ScramError, match="password authentication failed"):
        exchange("pw", scram.make_verifier("pw", iterations=ITER), mock=True)


def test_mock_verifier_looks_like_a_real_one_and_is_stable() -> None:
    a = scram.mock_verifier("nobody", b"k" * 32)
    assert a == scram.mock_verifier("nobody", b"k" * 32)
    assert a.salt != scram.mock_verifier("other", b"k" * 32).salt
    assert a.salt != scram.mock_verifier("nobody", b"j" * 32).salt
    assert (a.iterations, len(a.salt)) == (4096, 16)
    server_first = attrs(ScramServer(a, mock=True).first(b"n,,n=,r=abc"))
    real_first = attrs(ScramServer(scram.make_verifier("x")).first(b"n,,n=,r=abc"))
    assert server_first.keys() == real_first.keys()
    assert len(server_first["s"]) == len(real_first["s"])
    assert server_first["i"] == real_first["i"]


def test_server_nonce_extends_the_client_nonce_and_is_fresh() -> None:
    verifier = scram.make_verifier("x", iterations=ITER)
    a = attrs(ScramServer(verifier).first(b"n,,n=,r=clientnonce"))["r"]
    b = attrs(ScramServer(verifier).first(b"n,,n=,r=clientnonce"))["r"]
    assert a.startswith("clientnonce") and b.startswith("clientnonce")
    assert a != b and len(a) > len("clientnonce") + 16


# --------------------------------------------------------------------------
# hostile clients
# --------------------------------------------------------------------------
def started(password: str = "pw") -> tuple[ScramClient, ScramServer, bytes]:
    client = ScramClient(password)
    server = ScramServer(scram.make_verifier("pw", iterations=ITER))
    return client, server, client.final(server.first(client.first()))


@pytest.mark.parametrize(
    "client_first",
    [
        b"p=tls-server-end-point,,n=,r=abc",  # channel binding requested: not offered
        b"x,,n=,r=abc",
        b"n,z,n=,r=abc",  # authzid must be a=
        b"n,,n=",  # no nonce
        b"n,,n=,r=",  # empty nonce
        b"n,,m=ext,n=,r=abc",  # mandatory extension
        b"n,,n=,r=abc,garbage",
        b"n,,\xff\xfe",
        b"",
    ],
)
def test_malformed_client_first_is_refused(client_first: bytes) -> None:
    with pytest.raises(ScramError):
        ScramServer(scram.make_verifier("pw", iterations=ITER)).first(client_first)


def test_channel_binding_request_is_refused_with_a_clear_message() -> None:
    with pytest.raises(ScramError, match="channel binding"):
        ScramServer(scram.make_verifier("pw", iterations=ITER)).first(
            b"p=tls-server-end-point,,n=,r=abc"
        )


def tamper(final: bytes, key: str, value: str) -> bytes:
    parts = final.decode().split(",")
    return ",".join(f"{key}={value}" if p.startswith(f"{key}=") else p for p in parts).encode()


def test_tampered_nonce_is_refused() -> None:
    _, server, final = started()
    nonce = attrs(final)["r"]
    with pytest.raises(ScramError, match="nonce"):
        server.final(tamper(final, "r", nonce[:-1] + ("A" if nonce[-1] != "A" else "B")))


def test_client_nonce_alone_is_refused() -> None:
    client, server, final = started()
    with pytest.raises(ScramError):
        server.final(tamper(final, "r", client._nonce))


@pytest.mark.parametrize("header", [b"y,,", b"n,a=x,", b"p=tls-unique,,"])
def test_tampered_channel_binding_data_is_refused(header: bytes) -> None:
    _, server, final = started()
    with pytest.raises(ScramError, match="channel binding"):
        server.final(tamper(final, "c", base64.b64encode(header).decode()))


def test_y_flag_is_accepted_when_the_binding_data_matches() -> None:
    # "y": the client supports channel binding but thinks the server does not.
    # The proxy offers only SCRAM-SHA-256 (never -PLUS), so this is legitimate.
    verifier = scram.make_verifier("pw", iterations=ITER)
    server = ScramServer(verifier)
    server_first = server.first(b"y,,n=,r=abc").decode()
    salt = base64.b64decode(attrs(server_first.encode())["s"])
    without_proof = f"c={base64.b64encode(b'y,,').decode()},r={attrs(server_first.encode())['r']}"
    proof, signature = ref_proof_and_signature(
        "pw", salt, ITER, f"n=,r=abc,{server_first},{without_proof}"
    )
    assert server.final(f"{without_proof},p={proof}".encode()) == f"v={signature}".encode()


@pytest.mark.parametrize(
    "mutate",
    [
        lambda f: f.rsplit(b",p=", 1)[0],  # no proof
        lambda f: f.rsplit(b",p=", 1)[0] + b",p=!!!!",  # not base64
        lambda f: f.rsplit(b",p=", 1)[0] + b",p=" + base64.b64encode(b"short"),
        lambda f: f.rsplit(b",p=", 1)[0] + b",p=" + base64.b64encode(b"\x00" * 32),
        lambda f: f + b"\xff",
        lambda f: b"garbage",
    ],
)
def test_malformed_client_final_is_refused(mutate: Callable[[bytes], bytes]) -> None:
    _, server, final = started()
    with pytest.raises(ScramError):
        server.final(mutate(final))


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=120), st.binary(max_size=120))
def test_server_raises_only_scram_error_on_garbage(first: bytes, final: bytes) -> None:
    server = ScramServer(scram.make_verifier("pw", iterations=1))
    try:
        server.first(first)
    except ScramError:
        return
    try:
        server.final(final)
    except ScramError:
        return
    raise AssertionError("a random client-final message was accepted")


# --------------------------------------------------------------------------
# hostile upstreams (the client side)
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "server_first",
    [
        b"r=somebodyelse,s=QUJD,i=4096",  # nonce does not extend ours
        b"r=NONCE,s=QUJD,i=4096",  # nonce not extended at all
        b"r=NONCEx,s=QUJD,i=0",
        b"r=NONCEx,s=QUJD,i=-1",
        b"r=NONCEx,s=QUJD,i=many",
        b"r=NONCEx,s=***,i=4096",
        b"garbage",
    ],
)
def test_client_refuses_bad_server_first(server_first: bytes) -> None:
    client = ScramClient("pw", nonce="NONCE")
    with pytest.raises(ScramError):
        client.final(server_first)


def test_client_refuses_bad_server_final() -> None:
    client, server, final = started()
    good = server.final(final)
    with pytest.raises(ScramError, match="rejected"):
        client.verify(b"e=invalid-proof")
    with pytest.raises(ScramError):
        client.verify(b"v=" + base64.b64encode(b"\x00" * 32))
    with pytest.raises(ScramError):
        client.verify(b"v=\xff")
    client.verify(good)


# --------------------------------------------------------------------------
# verifiers
# --------------------------------------------------------------------------
@settings(max_examples=50, deadline=None)
@given(st.integers(1, 100_000), st.binary(min_size=1, max_size=64), st.binary(min_size=32,
       max_size=32), st.binary(min_size=32, max_size=32))
def test_verifier_encode_parse_round_trip(iterations: int, salt: bytes, stored: bytes,
                                          server: bytes) -> None:
    verifier = scram.Verifier(iterations, salt, stored, server)
    text = verifier.encode()
    assert text == (
        f"SCRAM-SHA-256${iterations}:{base64.b64encode(salt).decode()}"
        f"${base64.b64encode(stored).decode()}:{base64.b64encode(server).decode()}"
    )
    assert scram.parse_verifier(text) == verifier


def test_verifier_exact_postgresql_format() -> None:
    salt = bytes(range(16))
    verifier = scram.make_verifier("secret", salt=salt, iterations=4096)
    _, stored, server = ref_keys("secret", salt, 4096)
    assert verifier.encode() == (
        f"SCRAM-SHA-256$4096:{base64.b64encode(salt).decode()}"
        f"${base64.b64encode(stored).decode()}:{base64.b64encode(server).decode()}"
    )


def test_verifier_repr_holds_no_key_material() -> None:
    verifier = scram.make_verifier("secret", iterations=ITER)
    text = repr(verifier) + str(verifier)
    for secret in (verifier.salt, verifier.stored_key, verifier.server_key):
        assert base64.b64encode(secret).decode() not in text
        assert repr(secret) not in text


def test_make_verifier_uses_a_fresh_salt() -> None:
    a, b = scram.make_verifier("x", iterations=1), scram.make_verifier("x", iterations=1)
    assert a.salt != b.salt and len(a.salt) == 16


@pytest.mark.parametrize(
    "text",
    [
        "",
        "md5abc",
        "SCRAM-SHA-256",
        "SCRAM-SHA-1$4096:QUJD$" + "A" * 44 + ":" + "A" * 44,
        "SCRAM-SHA-256$4096:QUJD",
        "SCRAM-SHA-256$0:QUJD$" + RFC_VERIFIER.split("$", 2)[2],
        "SCRAM-SHA-256$-5:QUJD$" + RFC_VERIFIER.split("$", 2)[2],
        "SCRAM-SHA-256$many:QUJD$" + RFC_VERIFIER.split("$", 2)[2],
        "SCRAM-SHA-256$4096:!!!$" + RFC_VERIFIER.split("$", 2)[2],
        "SCRAM-SHA-256$4096:QUJD$QUJD:QUJD",  # keys not 32 bytes
        RFC_VERIFIER + "$extra",
        RFC_VERIFIER.replace(":W22", "W22"),
    ],
)
def test_parse_verifier_refuses_malformed(text: str) -> None:
    with pytest.raises(ScramError):
        scram.parse_verifier(text)


def test_parse_verifier_postgresql_value() -> None:
    verifier = scram.parse_verifier(RFC_VERIFIER)
    assert verifier.iterations == 4096
    assert verifier.salt == base64.b64decode(RFC_SALT)
    exchange(RFC_PASSWORD, verifier)


# --------------------------------------------------------------------------
# SASLprep, as PostgreSQL applies it (src/common/saslprep.c)
# --------------------------------------------------------------------------
def test_saslprep_ascii_is_unchanged() -> None:
    for text in ("pencil", "with space", "ctl\x01\x7f", ""):
        assert scram.saslprep(text) == text


def test_saslprep_maps_and_normalizes() -> None:
    assert scram.saslprep("I\u00adX") == "IX"  # B.1: mapped to nothing
    assert scram.saslprep("a\u00a0b") == "a b"  # C.1.2: non-ASCII space to space
    assert scram.saslprep("\u2168") == "IX"  # NFKC
    assert scram.saslprep("\u00aa") == "a"


def test_saslprep_prohibited_output_uses_the_raw_password() -> None:
    assert scram.saslprep("a\u0007\u00a0") == "a\u0007\u00a0"  # ASCII control with a mapping
    assert scram.saslprep("x\ue000\u00a0") == "x\ue000\u00a0"  # private use


def test_saslprep_bidi_violation_uses_the_raw_password() -> None:
    # RFC 3454 section 6 (applied by PostgreSQL's pg_saslprep): a string with a
    # RandALCat character must not contain an LCat one. Such a password is
    # "prohibited", so PostgreSQL hashes the raw bytes, mapping included.
    raw = "\u05d0\u00a0a"  # HEBREW ALEF, NO-BREAK SPACE, LATIN a
    assert scram.saslprep(raw) == raw


def test_saslprep_empty_after_mapping_uses_the_raw_password() -> None:
    # pg_saslprep: "don't allow empty password" -> prohibited -> raw bytes.
    assert scram.saslprep("\u00ad") == "\u00ad"


def test_saslprep_is_applied_on_both_sides() -> None:
    verifier = scram.make_verifier("\u2168", iterations=ITER)
    exchange("IX", verifier)


# --------------------------------------------------------------------------
# md5
# --------------------------------------------------------------------------
def test_md5_password_matches_postgresql() -> None:
    # pg_authid stores md5(password || user): "md5" + 3175bce1... for postgres/postgres
    inner = "3175bce1d3201d16594cebf9d7eb3f9d"
    assert hashlib.md5(b"postgrespostgres").hexdigest() == inner
    salt = b"\x01\x02\x03\x04"
    expected = b"md5" + hashlib.md5(inner.encode() + salt).hexdigest().encode()
    assert scram.md5_password("postgres", "postgres", salt) == expected
    assert len(expected) == 35


def test_md5_password_depends_on_user_and_salt() -> None:
    base = scram.md5_password("alice", "pw", b"abcd")
    assert base != scram.md5_password("bob", "pw", b"abcd")
    assert base != scram.md5_password("alice", "pw", b"abce")
    assert base.startswith(b"md5") and all(c in b"0123456789abcdef" for c in base[3:])
