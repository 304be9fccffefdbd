"""Which notification channels a configuration turns on.

Owns: building the queue-side notifiers (for ``ApprovalService``) and the
send-side senders (for ``DeliveryWorker``) of the channels configured under
``notify:`` beside webhooks: Slack (``notify.slack``) and email
(``notify.email``).

Must not: build payloads or send anything itself; each channel's module
does (``approvals.slack``, ``approvals.email_notify``).
"""

from __future__ import annotations

from approvals.channels import Notifier, Sender
from approvals.email_notify import EmailNotifier, EmailSender
from approvals.slack import SlackNotifier, SlackSender
from config.settings import Settings


def notifiers(settings: Settings) -> list[Notifier]:
    found: list[Notifier] = []
    if settings.slack is not None:
        found.append(SlackNotifier(settings))
    if settings.email is not None:
        found.append(EmailNotifier(settings))
    return found


def senders(settings: Settings) -> list[Sender]:
    found: list[Sender] = []
    if settings.slack is not None:
        found.append(SlackSender(settings.slack))
    if settings.email is not None:
        found.append(EmailSender(settings.email))
    return found


def any_channel(settings: Settings) -> bool:
    """Whether a delivery worker is needed."""
    return bool(settings.webhooks) or settings.slack is not None or settings.email is not None
