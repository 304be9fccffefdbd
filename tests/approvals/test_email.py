"""Email notifications through a real SMTP server on 127.0.0.1 (aiosmtpd) that captures the mail.

The approvals service and delivery worker are the real ones over a SQLite
store; the SMTP server is aiosmtpd on a free port, with STARTTLS on a
throwaway self-signed certificate made with ``openssl`` for the TLS test.
"""

from __future__ import annotations

import dataclasses
import email
import email.policy
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session

from approvals import workflow
from approvals.email_notify import EmailNotifier, EmailSender
from approvals.model import Request
from approvals.service import ApprovalService
from approvals.store import DeliveryStatus, Store, open_store
from approvals.webhooks import DeliveryWorker
from config.settings import Api, EmailSettings, Settings
from tests.approvals.api_harness import Clock, make_settings
from tests.approvals.helpers import DBA, DIRECTORY, StepDef, make_request, statement
from tests.conftest import free_port

ADDRESSES = {name: f"{name}@example.com" for name in ("alice", "bob", "carol", "erin", "frank")}  # dave: none
LINK_BASE = "https://pgvouch.example.com"
SECURITY = StepDef("security", ("group:security",))
USER_ENV, PASSWORD_ENV = "PGV_TEST_SMTP_USER", "PGV_TEST_SMTP_PASSWORD"


@dataclass
class Inbox:
    """What the SMTP server accepted: one entry per message, with its envelope recipients."""

    mails: list[tuple[list[str], EmailMessage]] = field(default_factory=list)
    logins: list[str] = field(default_factory=list)

    async def handle_DATA(self, server: SMTPServer, session: Session, envelope: Envelope) -> str:
        raw = envelope.content if isinstance(envelope.content, bytes) else str(envelope.content).encode()
        message = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        self.mails.append((list(envelope.rcpt_tos), message))
        return "250 OK"

    def to(self, address: str) -> list[EmailMessage]:
        return [message for rcpt, message in self.mails if address in rcpt]

    def recipients(self) -> list[str]:
        return sorted(address for rcpt, _ in self.mails for address in rcpt)


@contextmanager
def smtp_server(port: int, **kwargs: Any) -> Iterator[Inbox]:
    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=port, **kwargs)
    controller.start()
    try:
        yield inbox
    finally:
        controller.stop()


@dataclass
class MailEnv:
    service: ApprovalService
    store: Store
    clock: Clock
    settings: Settings
    worker: DeliveryWorker

    async def submit(self, steps: Sequence[StepDef] = (DBA,), **kwargs: Any) -> Request:
        return await self.service.create(make_request(steps=steps, now=self.clock(), **kwargs))

    async def deliver(self) -> int:
        return await self.worker.run_once()


def mail_settings(port: int, *, store: str, **email_options: Any) -> Settings:
    base = make_settings(store=store)
    users = {name: dataclasses.replace(user, email=ADDRESSES.get(name)) for name, user in base.users.items()}
    options: dict[str, Any] = {"smtp_port": port, "starttls": False, "timeout": 5.0, **email_options}
    return dataclasses.replace(base, users=users, api=Api(public_url=LINK_BASE + "/"),
                               email=EmailSettings("127.0.0.1", "pgvouch@example.com", **options))


@asynccontextmanager
async def mail_env(tmp_path: Path, port: int, **email_options: Any) -> AsyncIterator[MailEnv]:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    store = await open_store(url)
    clock = Clock()
    settings = mail_settings(port, store=url, **email_options)
    assert settings.email is not None
    service = ApprovalService(store, DIRECTORY, notifiers=[EmailNotifier(settings)], clock=clock)
    worker = DeliveryWorker(store, settings, senders=[EmailSender(settings.email)], clock=clock)
    try:
        yield MailEnv(service, store, clock, settings, worker)
    finally:
        await worker.close()
        await store.close()


def subject_of(message: EmailMessage) -> str:
    """The subject as a reader sees it (a long one is folded onto the next header line)."""
    return " ".join(str(message["Subject"]).split())


def body_of(message: EmailMessage) -> str:
    part = message.get_body(("plain",))
    assert part is not None
    return str(part.get_content())


# -- who gets what ---------------------------------------------------------------------


async def test_a_new_request_mails_each_eligible_approver_but_the_requester(tmp_path: Path) -> None:
    port = free_port()
    with smtp_server(port) as inbox:
        async with mail_env(tmp_path, port) as env:
            # bob asks; the DBA step's other people (carol, frank) are mailed, never bob
            request = await env.submit(requester="bob", subject=statement(
                "UPDATE accounts SET balance = 0 WHERE id = $1", value="7"))
            assert await env.deliver() == 2  # one delivery per recipient
            assert inbox.recipients() == ["carol@example.com", "frank@example.com"]
            [mail] = inbox.to("carol@example.com")
            assert mail["From"] == "pgvouch@example.com" and mail["To"] == "carol@example.com"
            assert subject_of(mail) == (f"[pgvouch] {request.id} needs your approval: statement by bob "
                                        "on prod-db/app")
            text = body_of(mail)
            assert "    UPDATE accounts SET balance = 0 WHERE id = $1" in text
            assert "$1 = '7'" in text
            assert "Step 1/1 'DBA review': 0/1 approvals so far." in text
            assert f"{LINK_BASE}/requests/{request.id}" in text  # the Activity Queue's review page
            targets = sorted(d.target for d in await env.store.list_deliveries())
            assert targets == ["carol@example.com", "frank@example.com"]


async def test_the_next_step_is_mailed_when_a_step_completes(tmp_path: Path) -> None:
    port = free_port()
    with smtp_server(port) as inbox:
        async with mail_env(tmp_path, port) as env:
            request = await env.submit(steps=(DBA, SECURITY))
            await env.deliver()
            assert inbox.recipients() == ["bob@example.com", "carol@example.com", "frank@example.com"]
            inbox.mails.clear()
            await env.service.vote(request.id, "carol", "approve", None)
            await env.deliver()
            # the security step: erin (carol is in it too, but a person counts once per request)
            assert inbox.recipients() == ["erin@example.com"]
            assert "Step 2/2 'security': 0/1 approvals so far." in body_of(inbox.to("erin@example.com")[0])


async def test_the_requester_hears_approved_denied_with_the_note_and_expired(tmp_path: Path) -> None:
    port = free_port()
    with smtp_server(port) as inbox:
        async with mail_env(tmp_path, port) as env:
            approved, denied, expired = await env.submit(), await env.submit(), await env.submit()
            await env.deliver()
            inbox.mails.clear()
            await env.service.vote(approved.id, "bob", "approve", "fine")
            await env.service.vote(denied.id, "carol", "deny", "not during the audit")
            env.clock.advance(9 * 3600)
            assert await env.service.expire_due() == 1
            while await env.deliver():
                pass
            assert inbox.recipients() == ["alice@example.com"] * 3
            subjects = {subject_of(m): body_of(m) for m in inbox.to("alice@example.com")}
            assert subjects.keys() == {
                f"[pgvouch] {approved.id} approved: your statement on prod-db/app",
                f"[pgvouch] {denied.id} denied: your statement on prod-db/app",
                f"[pgvouch] {expired.id} expired without a decision: your statement on prod-db/app",
            }
            deny_text = subjects[f"[pgvouch] {denied.id} denied: your statement on prod-db/app"]
            assert f"Your request {denied.id} was denied by carol." in deny_text
            assert "Note: not during the audit" in deny_text
            assert f"{LINK_BASE}/requests/{denied.id}" in deny_text


async def test_announcements_go_to_owners_and_announce_to(tmp_path: Path) -> None:
    port = free_port()
    with smtp_server(port) as inbox:
        async with mail_env(tmp_path, port, announce_to=("group:security",)) as env:
            await env.service.announce("approval_mode.off", "frank", {"resources": "prod-*",
                                                                       "reason": "incident 4711"})
            await env.deliver()
            # frank is the owner; carol and erin are in group security
            assert inbox.recipients() == ["carol@example.com", "erin@example.com", "frank@example.com"]
            [mail] = inbox.to("erin@example.com")
            assert subject_of(mail) == "[pgvouch] approval_mode.off by frank"
            assert "reason: incident 4711" in body_of(mail)


# -- delivery ----------------------------------------------------------------------------


async def test_a_down_smtp_server_leaves_the_mail_queued_for_retry(tmp_path: Path) -> None:
    port = free_port()
    async with mail_env(tmp_path, port) as env:
        await env.submit()
        assert await env.deliver() == 3
        queued = await env.store.list_deliveries()
        assert {d.status for d in queued} == {DeliveryStatus.PENDING}
        assert all("Connection refused" in (d.last_error or "") for d in queued)
        with smtp_server(port) as inbox:
            env.clock.advance(5)
            assert await env.deliver() == 3
            assert inbox.recipients() == ["bob@example.com", "carol@example.com", "frank@example.com"]
        assert {d.status for d in await env.store.list_deliveries()} == {DeliveryStatus.DELIVERED}


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "smtp.crt", tmp_path / "smtp.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True)
    return cert, key


async def test_starttls_with_a_verified_certificate_and_a_login(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = _self_signed(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    monkeypatch.setenv(USER_ENV, "pgvouch")
    monkeypatch.setenv(PASSWORD_ENV, "smtp-pass")
    logins: list[str] = []

    def authenticate(server: SMTPServer, session: Session, envelope: Envelope, mechanism: str,
                     data: Any) -> AuthResult:
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == (b"pgvouch", b"smtp-pass")
        if ok:
            logins.append("tls" if session.ssl is not None else "clear")
        return AuthResult(success=ok)

    port = free_port()
    with smtp_server(port, tls_context=server_tls, require_starttls=True, authenticator=authenticate,
                     auth_required=True) as inbox:
        async with mail_env(tmp_path, port, starttls=True, ca_file=str(cert), username_env=USER_ENV,
                            password_env=PASSWORD_ENV) as env:
            await env.submit()
            assert await env.deliver() == 3
            assert inbox.recipients() == ["bob@example.com", "carol@example.com", "frank@example.com"]
            assert logins == ["tls"] * 3  # the password only ever went over TLS
        # a server certificate we do not trust: nothing is sent, the mail stays queued
        (tmp_path / "untrusted").mkdir()
        async with mail_env(tmp_path / "untrusted", port, starttls=True, username_env=USER_ENV,
                            password_env=PASSWORD_ENV) as env:
            inbox.mails.clear()
            await env.submit()
            assert await env.deliver() == 3
            assert inbox.mails == []
            queued = await env.store.list_deliveries()
            assert {d.status for d in queued} == {DeliveryStatus.PENDING}
            assert all("CERTIFICATE_VERIFY_FAILED" in (d.last_error or "") for d in queued)


async def test_starttls_is_never_skipped_when_the_server_lacks_it(tmp_path: Path) -> None:
    port = free_port()
    with smtp_server(port) as inbox:  # no STARTTLS offered
        async with mail_env(tmp_path, port, starttls=True) as env:
            await env.submit()
            assert await env.deliver() == 3
            assert inbox.mails == []
            queued = await env.store.list_deliveries()
            assert {d.status for d in queued} == {DeliveryStatus.PENDING}
            assert all("STARTTLS" in (d.last_error or "") for d in queued)


def test_users_without_an_address_are_skipped() -> None:
    settings = mail_settings(25, store="sqlite:///unused.db")
    notifier = EmailNotifier(settings)
    request = make_request(steps=(StepDef("anyone", ("dave", "bob")),))
    created = workflow.submitted_events(request)[0]
    assert [o.target for o in notifier.for_event(created, request)] == ["bob@example.com"]
