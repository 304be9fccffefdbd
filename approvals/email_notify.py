"""Email notifications: who gets which mail, what it says, and sending it over SMTP.

Owns: the recipients of each request event (:class:`EmailNotifier`):

- ``request.created``: every eligible approver of the first step (never the
  requester: the step's snapshot excludes them);
- ``request.step_completed`` with a next step: the people who may approve it;
- ``request.approved`` / ``denied`` (with the note) / ``expired`` /
  ``revoked`` / ``ended`` (a grant's window closed): the requester;
- an announcement (break-glass): every user with role ``owner`` plus the
  users and ``group:NAME`` members in ``notify.email.announce_to``;

only users with an ``email`` are mailed, one queued delivery per recipient
(a failing address never holds up the others). Each mail has a link to the
request in the Activity Queue (``api.public_url`` + ``/requests/<id>``).
:class:`EmailSender` sends a queued mail with the stdlib's ``smtplib`` in a
worker thread, with STARTTLS (certificate verified; ``ca_file`` to trust a
private CA) unless ``starttls: false``, and a login when ``username_env`` /
``password_env`` are set (read from the environment at send time, never
logged).

Must not: decide anything about requests, or send on the caller's task: mail
leaves through the durable delivery queue (``DeliveryWorker``), so an SMTP
server that is down leaves deliveries queued for retry.
"""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

from approvals import preview as impact
from approvals import workflow
from approvals.channels import EMAIL, Announcement, DeliveryFailed
from approvals.model import Request, SubjectKind, canonical_json
from approvals.store import Delivery, Outbound
from approvals.workflow import GROUP_PREFIX, Event, EventType, format_duration
from config.settings import EmailSettings, Settings
from config.yamlnodes import ConfigError

OWNER_ROLE = "owner"
MAX_SQL = 20_000  # characters of SQL in a mail

_TO_REQUESTER = {
    EventType.APPROVED: "approved",
    EventType.DENIED: "denied",
    EventType.EXPIRED: "expired without a decision",
    EventType.REVOKED: "revoked",
    EventType.ENDED: "ended",
}


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _when(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M UTC")


class EmailNotifier:
    channel = EMAIL

    def __init__(self, settings: Settings) -> None:
        assert settings.email is not None
        self.settings = settings

    # -- recipients --------------------------------------------------------------
    def _addresses(self, users: Iterable[str]) -> list[str]:
        found = {self.settings.users[name].email for name in users if name in self.settings.users}
        return sorted(address for address in found if address)

    def recipients(self, event: Event, request: Request) -> list[str]:
        if event.type is EventType.CREATED:
            return self._addresses(request.steps[0].eligible - {request.requester})
        if event.type is EventType.STEP_COMPLETED:
            following = event.data.get("next_eligible") or ()
            return self._addresses(set(following) - {request.requester})
        if event.type in _TO_REQUESTER and event.actor != request.requester:
            return self._addresses([request.requester])
        return []

    def announcement_recipients(self) -> list[str]:
        assert self.settings.email is not None
        wanted = set(self.settings.email.announce_to)
        groups = {entry[len(GROUP_PREFIX):] for entry in wanted if entry.startswith(GROUP_PREFIX)}
        return self._addresses(
            name for name, user in self.settings.users.items()
            if OWNER_ROLE in user.roles or name in wanted or groups & set(user.groups))

    # -- content -------------------------------------------------------------------
    def for_event(self, event: Event, request: Request) -> Sequence[Outbound]:
        recipients = self.recipients(event, request)
        if not recipients:
            return []
        subject, text = self.compose(event, request)
        return [Outbound(EMAIL, address, {"event": str(event.type), "request": {"id": request.id},
                                          "to": address, "subject": subject, "text": text})
                for address in recipients]

    def for_announcement(self, announcement: Announcement) -> Sequence[Outbound]:
        subject = _one_line(f"[pgvouch] {announcement.type} by {announcement.actor}")
        lines = [f"{announcement.type} by {announcement.actor} at {_when(announcement.at)}", ""]
        for key, value in sorted(announcement.data.items()):
            lines.append(f"{key}: {value if isinstance(value, str) else canonical_json(value)}")
        lines += ["", f"Activity Queue: {self.settings.api.base_url()}/"]
        text = "\n".join(lines) + "\n"
        return [Outbound(EMAIL, address, {"event": announcement.type, "to": address,
                                          "subject": subject, "text": text})
                for address in self.announcement_recipients()]

    def compose(self, event: Event, request: Request) -> tuple[str, str]:
        """The subject line and plain-text body of ``event``'s mail."""
        what = "grant" if request.subject_kind is SubjectKind.GRANT else "statement"
        where = f"{request.resource}/{request.account}"
        link = f"{self.settings.api.base_url()}/requests/{request.id}"
        if event.type in _TO_REQUESTER:
            outcome = _TO_REQUESTER[event.type]
            subject = f"[pgvouch] {request.id} {outcome}: your {what} on {where}"
            if event.type is EventType.ENDED:
                intro = [f"Your grant {request.id} ended at {_when(request.approved_until or event.at)}: "
                         "its time window closed. Request a new grant if you still need access."]
            else:
                intro = [f"Your request {request.id} was {outcome}"
                         + ("" if event.type is EventType.EXPIRED else f" by {event.actor}") + "."]
            if event.type is EventType.DENIED or (event.type is EventType.REVOKED and request.note):
                intro.append(f"Note: {request.note or '(none)'}")
            if event.type is EventType.APPROVED and request.approved_until is not None:
                usable = "The grant is open" if what == "grant" else "Re-send the statement"
                intro.append(f"{usable} until {_when(request.approved_until)}.")
        else:
            subject = f"[pgvouch] {request.id} needs your approval: {what} by {request.requester} on {where}"
            progress = workflow.progress(request, event.at)
            step = progress.steps[progress.current_step] if progress.current_step is not None else None
            intro = [f"{request.requester} asks for approval of a {what} on {where}."]
            if step is not None:
                intro.append(f"Step {step.index + 1}/{len(progress.steps)} {step.name!r}: "
                             f"{step.count} approvals so far.")
            intro.append(f"Expires in {format_duration(max(0.0, request.expires_at - event.at))} "
                         f"({_when(request.expires_at)}).")
        body = [*intro, "", *self._subject_lines(request), "",
                f"Requester: {request.requester}", f"Resource/account: {where}",
                f"Policy: {', '.join(request.policies) or '-'}", "",
                f"Review it in the Activity Queue: {link}"]
        return _one_line(subject), "\n".join(body) + "\n"

    @staticmethod
    def _subject_lines(request: Request) -> list[str]:
        subject = request.subject
        if request.subject_kind is SubjectKind.GRANT:
            return [f"Grant: {', '.join(subject.get('kinds', ()))} on "
                    f"{', '.join(subject.get('tables') or ()) or 'all tables'} for "
                    f"{format_duration(float(subject.get('duration', 0)))}",
                    f"Reason: {subject.get('reason') or '-'}"]
        sql = str(subject.get("sql", ""))
        lines = ["Statement:", *("    " + line for line in sql[:MAX_SQL].splitlines())]
        params = subject.get("params") or ()
        for number, param in enumerate(params, start=1):
            lines.append(f"    ${number} = {param.get('value')!r}")
        if request.preview is not None:
            lines.append(f"Impact: {impact.summary(request.preview)}")
        return lines


class EmailSender:
    """Sends a queued mail over SMTP (STARTTLS, login) in a worker thread."""

    channel = EMAIL

    def __init__(self, email: EmailSettings) -> None:
        self.email = email

    async def close(self) -> None:
        return None

    async def send(self, delivery: Delivery) -> None:
        payload = delivery.payload
        fields = (payload.get("to"), payload.get("subject"), payload.get("text"))
        if not all(isinstance(value, str) and value for value in fields):
            raise DeliveryFailed("the queued mail lacks to, subject or text", permanent=True)
        try:
            credentials = self.email.credentials()
        except ConfigError as exc:
            raise DeliveryFailed(str(exc)) from None
        message = build_message(self.email.sender, delivery.target, str(payload["subject"]),
                                str(payload["text"]), delivery.id)
        try:
            await asyncio.to_thread(self._deliver, message, credentials)
        except (smtplib.SMTPException, OSError, ssl.SSLError) as exc:
            raise DeliveryFailed(f"{type(exc).__name__}: {exc}".rstrip(": ")) from None

    def _deliver(self, message: EmailMessage, credentials: tuple[str, str] | None) -> None:
        with smtplib.SMTP(self.email.smtp_host, self.email.smtp_port, timeout=self.email.timeout) as smtp:
            if self.email.starttls:
                context = ssl.create_default_context(cafile=self.email.ca_file)
                smtp.starttls(context=context)  # refuses (SMTPNotSupportedError) rather than send in clear
            if credentials is not None:
                smtp.login(*credentials)
            smtp.send_message(message)


def build_message(sender: str, to: str, subject: str, text: str, delivery_id: int) -> EmailMessage:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    message["Subject"] = _one_line(subject)
    message["Date"] = formatdate(usegmt=True)
    message["Message-ID"] = make_msgid("pgvouch", domain=sender.rpartition("@")[2].strip("> ") or None)
    message["X-Pgvouch-Delivery"] = str(delivery_id)
    message.set_content(text)
    return message
