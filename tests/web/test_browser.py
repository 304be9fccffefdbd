"""The Activity Queue in a real browser against a real ``pgvouch serve``.

Debian's chromium (``/usr/bin/chromium``, installed by
``scripts/ensure-system-deps.sh``) driven by playwright; alice's statements
are held through the proxy by real psql (and psycopg for bound parameters),
reviewers sign in with their API tokens and decide in the page. One server
and one browser serve the whole module; each test finds its own request by
the statement's text. The queue's screenshot lands in
``test-artifacts/activity-queue.png`` (and ``docs/activity-queue.png`` when
``PGVOUCH_UPDATE_DOCS`` is set).
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.conftest import PgServer, config_yaml, free_port
from tests.e2e.helpers import (
    ALLOW_READS,
    DANGEROUS,
    add_tokens,
    deny,
    policy,
    proxy_dsn,
    psql_popen,
    review,
    serve_extra,
    serving,
    write_policies,
)

CHROMIUM = "/usr/bin/chromium"
# Flags this machine needs (closed network, root); playwright adds a fresh --user-data-dir itself.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ROOT = Path(__file__).resolve().parents[2]
TOKENS = {"alice": "pgv_web_alice_0123456789", "bob": "pgv_web_bob_0123456789",
          "carol": "pgv_web_carol_0123456789", "dave": "pgv_web_dave_0123456789"}
POLICY = policy(
    ALLOW_READS,
    review(tables='"events"', message="Writes to events need two reviewers",
           approval='{steps: [{name: Two reviewers, approvers: ["group:dba", "dave"], required: 2}]}'),
    review(message="Writes need a DBA"),
    deny(f"{DANGEROUS}, ddl"),
    name="prod-writes")

@dataclass
class Served:
    port: int
    api_port: int
    proc: subprocess.Popen[bytes]
    log: Path
    held: list[Held] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def hold_psql(self, sql: str) -> Held:
        held = Held(proc=psql_popen(self.port, sql))
        self.held.append(held)
        return held

    def hold_bound(self, sql: str, params: tuple[Any, ...]) -> Held:
        """alice runs ``sql`` with bound parameters (extended protocol) in a thread."""
        held = Held()

        def run() -> None:
            try:
                with psycopg.connect(proxy_dsn(self.port), autocommit=True) as conn:
                    conn.execute(sql, params)
                held.error = None
            except psycopg.Error as exc:
                held.error = str(exc)

        held.thread = threading.Thread(target=run, daemon=True)
        held.thread.start()
        self.held.append(held)
        return held

    def api(self, method: str, path: str, user: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.base}/api/v1{path}", data=data, method=method,
                                         headers={"Authorization": f"Bearer {TOKENS[user]}",
                                                  "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def pending_id(self, text: str, timeout: float = 10) -> str:
        """The id of the pending request whose statement contains ``text``."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            for item in self.api("GET", "/requests?status=pending", "bob")["requests"]:
                if text in item["subject"].get("sql", ""):
                    return str(item["id"])
            time.sleep(0.1)
        raise AssertionError(f"no pending request with {text!r}")


@dataclass
class Held:
    """A statement of alice's held by the proxy: a psql process or a psycopg thread."""

    proc: subprocess.Popen[str] | None = None
    thread: threading.Thread | None = None
    error: str | None = "still running"

    def finish(self, timeout: float = 20) -> tuple[int, str]:
        """(exit code, stderr) of psql; (0 or 1, error) of psycopg."""
        if self.proc is not None:
            _, err = self.proc.communicate(timeout=timeout)
            return self.proc.returncode, err
        assert self.thread is not None
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the statement is still held"
        return (0 if self.error is None else 1), self.error or ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture(scope="module")
def served(pg: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("web")
    policies = write_policies(tmp / "policies", POLICY)
    port, api_port = free_port(), free_port()
    extra = serve_extra(policies, f"sqlite:///{tmp}/approvals.db", "wait_timeout: 60s, heartbeat: 2s")
    config = tmp / "pgvouch.yaml"
    config.write_text(add_tokens(config_yaml(pg, port=port, api_port=api_port, extra=extra), TOKENS))
    log = tmp / "pgvouch.log"
    with serving(config, (port, api_port), log=log, log_stdout=True, cwd=ROOT) as proc:
        served = Served(port, api_port, proc, log)
        try:
            yield served
        finally:
            for held in served.held:
                held.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():  # like PostgreSQL in tests/conftest.py: fail loudly, never skip
        pytest.fail(f"no {CHROMIUM} for the browser tests: run scripts/ensure-system-deps.sh "
                    "(as root it installs Debian's chromium)", pytrace=False)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def signed_in(served: Served, browser: Browser) -> Iterator[Callable[[str], Page]]:
    """A page signed in as a user, each user in a browser context (cookie jar) of their own."""
    contexts = []

    def sign_in(user: str) -> Page:
        context = browser.new_context(viewport={"width": 1440, "height": 860})
        context.set_default_timeout(15_000)
        contexts.append(context)
        page = context.new_page()
        page.goto(served.base + "/")
        expect(page).to_have_url(served.base + "/signin")
        page.get_by_label("API token").fill(TOKENS[user])
        page.get_by_role("button", name="Sign in").click()
        expect(page).to_have_url(served.base + "/")
        expect(page.locator(".who")).to_contain_text(f"Signed in as {user}")
        return page

    yield sign_in
    for context in contexts:
        context.close()


def _row(page: Page, text: str) -> Any:
    return page.locator("#queue-results tbody tr", has_text=text)


def test_bob_approves_alices_held_statement(served: Served, signed_in: Callable[[str], Page],
                                            pg: PgServer) -> None:
    pg.psql("UPDATE accounts SET balance = 110 WHERE id = 11")
    held = served.hold_psql("UPDATE accounts SET balance = 0 WHERE id = 11")
    rid = served.pending_id("WHERE id = 11")
    page = signed_in("bob")
    row = _row(page, rid)
    expect(row).to_contain_text("UPDATE accounts SET balance = 0 WHERE id = 11")
    expect(row).to_contain_text("alice")
    expect(row).to_contain_text("app / app")
    expect(row).to_contain_text("prod-writes")
    expect(row.locator(".status")).to_have_text("Pending")
    row.get_by_role("link", name="Review").click()
    dialog = page.locator("#review-dialog")
    expect(dialog).to_be_visible()
    expect(dialog.locator("pre.sql .kw").first).to_have_text("UPDATE")
    expect(dialog).to_contain_text("Nobody has reviewed this request yet.")
    expect(dialog).to_contain_text("Your approval completes the request")
    page.screenshot(path=_artifact("review-dialog.png"))
    assert pg.psql("SELECT balance FROM accounts WHERE id = 11").strip() == "110"
    dialog.get_by_label("Note for the requester (optional)").fill("checked the WHERE")
    dialog.get_by_role("button", name="Approve").click()
    expect(page.locator(".flash.ok")).to_contain_text(f"You approved {rid}: it has all its approvals")
    code, err = held.finish()
    assert code == 0 and f"held for approval as request {rid}" in err
    assert pg.psql("SELECT balance FROM accounts WHERE id = 11").strip() == "0"
    expect(_row(page, rid).locator(".status")).to_have_text("Executed")  # live: the release and run
    expect(_row(page, rid).locator(".action")).to_have_text("—")


def test_four_eyes_alice_cannot_review_her_own_request(served: Served,
                                                       signed_in: Callable[[str], Page]) -> None:
    held = served.hold_psql("UPDATE accounts SET balance = 1 WHERE id = 12")
    rid = served.pending_id("WHERE id = 12")
    page = signed_in("alice")
    row = _row(page, rid)
    expect(row.locator(".action")).to_have_text("Awaiting another reviewer")
    expect(row.get_by_role("link", name="Review")).to_have_count(0)
    row.get_by_role("link", name=rid).click()
    dialog = page.locator("#review-dialog")
    expect(dialog).to_contain_text("you cannot review your own request (four-eyes)")
    expect(dialog.get_by_role("button", name="Approve")).to_have_count(0)
    dialog.get_by_role("button", name="Cancel request").click()
    expect(page.locator(".flash.ok")).to_have_text(f"You cancelled {rid}.")
    expect(_row(page, rid).locator(".status")).to_have_text("Cancelled")
    code, err = held.finish()
    assert code != 0 and "cancel" in err.lower()


def test_two_of_three_quorum(served: Served, signed_in: Callable[[str], Page], pg: PgServer) -> None:
    held = served.hold_psql("INSERT INTO events (payload) VALUES ('quorum-web')")
    rid = served.pending_id("quorum-web")
    bob = signed_in("bob")
    row = _row(bob, rid)
    expect(row.locator(".status")).to_have_text("Pending (0/2)")
    row.get_by_role("link", name="Review").click()
    dialog = bob.locator("#review-dialog")
    expect(dialog).to_contain_text("After your approval, 1 more approval will be needed.")
    dialog.get_by_label("Note for the requester (optional)").fill("first pair of eyes")
    dialog.get_by_role("button", name="Approve").click()
    expect(bob.locator(".flash.ok")).to_contain_text(f"You approved {rid}: 1 more approval needed")
    row = _row(bob, rid)
    expect(row.locator(".status")).to_have_text("Pending (1/2)")
    expect(row.locator(".action")).to_have_text("You've already reviewed")

    carol = signed_in("carol")
    row = _row(carol, rid)
    expect(row.locator(".status")).to_have_text("Pending (1/2)")
    row.get_by_role("link", name="Review").click()
    dialog = carol.locator("#review-dialog")
    expect(dialog.locator(".votes")).to_contain_text("bob approved step 1")
    expect(dialog.locator(".votes")).to_contain_text("first pair of eyes")
    expect(dialog).to_contain_text("Your approval completes the request")
    dialog.get_by_role("button", name="Approve").click()
    expect(carol.locator(".flash.ok")).to_contain_text("it has all its approvals")
    code, err = held.finish()
    assert code == 0, err
    assert pg.psql("SELECT count(*) FROM events WHERE payload = 'quorum-web'").strip() == "1"
    expect(_row(bob, rid).locator(".status")).to_have_text("Executed")  # bob's page, without reload


def test_csrf_a_post_without_the_token_is_refused(served: Served, signed_in: Callable[[str], Page]) -> None:
    held = served.hold_psql("UPDATE accounts SET balance = 3 WHERE id = 13")
    rid = served.pending_id("WHERE id = 13")
    page = signed_in("bob")
    forged = page.request.post(f"{served.base}/requests/{rid}/decide", form={"decision": "approve"})
    assert forged.status == 403 and "csrf_failed" in forged.text()
    assert served.api("GET", f"/requests/{rid}", "bob")["status"] == "pending"
    _row(page, rid).get_by_role("link", name="Review").click()
    dialog = page.locator("#review-dialog")
    dialog.get_by_label("Note for the requester (optional)").fill("use the migration tool")
    dialog.get_by_role("button", name="Deny").click()
    expect(page.locator(".flash.ok")).to_have_text(f"You denied {rid}.")
    code, err = held.finish()
    assert code != 0 and "denied by bob: use the migration tool" in err


def test_live_update_and_the_queue_screenshot(served: Served, signed_in: Callable[[str], Page]) -> None:
    page = signed_in("bob")
    expect(page.locator("html")).to_have_attribute("data-live", "connected")
    page.evaluate("window.notReloaded = true")
    badge = page.locator("#pending-badge")
    before = int(badge.inner_text())
    served.hold_bound("UPDATE accounts SET balance = %s, owner = %s WHERE id = %s", (99, "ops team", 17))
    row = _row(page, "WHERE id = $3")
    expect(row).to_be_visible()  # arrived over server-sent events
    expect(badge).to_have_text(str(before + 1))
    assert page.evaluate("window.notReloaded") is True
    review = row.get_by_role("link", name="Review")
    review.focus()
    page.keyboard.press("Enter")  # the keyboard opens the dialog, Escape closes it
    params = page.locator("#review-dialog table.params")
    expect(params).to_contain_text("ops team")
    expect(params.locator("tbody tr")).to_have_count(3)
    expect(page.get_by_label("Note for the requester (optional)")).to_be_focused()
    page.keyboard.press("Escape")
    expect(page.locator("#review-dialog")).not_to_be_visible()
    expect(review).to_be_focused()

    # a second quorum request that bob has already approved, for the picture
    served.hold_psql("INSERT INTO events (payload) VALUES ('nightly cleanup of stale sessions')")
    rid = served.pending_id("nightly cleanup")
    served.api("POST", f"/requests/{rid}/approve", "bob", {"note": "fine by me"})
    expect(_row(page, rid).locator(".status")).to_have_text("Pending (1/2)")
    expect(badge).to_have_text(str(before + 2))
    page.locator("#live-status").evaluate("node => node.textContent = ''")
    page.mouse.move(0, 0)
    shot = page.screenshot(path=_artifact("activity-queue.png"))
    if os.environ.get("PGVOUCH_UPDATE_DOCS") or not (ROOT / "docs" / "activity-queue.png").exists():
        # the README's screenshot: refreshed on request, so test runs leave the tree clean
        (ROOT / "docs").mkdir(exist_ok=True)
        (ROOT / "docs" / "activity-queue.png").write_bytes(shot)


def test_audit_tab_shows_the_chain_verified(served: Served, signed_in: Callable[[str], Page]) -> None:
    page = signed_in("carol")
    page.get_by_role("link", name="Audit").click()
    expect(page.locator(".chain")).to_contain_text("Chain verified")
    page.get_by_label("Type").fill("request.approved")
    page.get_by_label("Actor").fill("carol")
    page.get_by_role("button", name="Filter").click()
    rows = page.locator("table.audit tbody tr")
    expect(rows).to_have_count(1)
    expect(rows).to_contain_text("request.approved")
    page.screenshot(path=_artifact("audit.png"), full_page=True)
    page.get_by_role("link", name="Grants").click()
    expect(page.locator("table.grants")).to_contain_text("No active or pending grants.")


def test_xss_a_statement_with_script_is_shown_as_text(served: Served,
                                                      signed_in: Callable[[str], Page]) -> None:
    payload = "<script>window.pwned = 1</script><img src=x onerror=\"window.pwned = 2\">"
    held = served.hold_psql(f"UPDATE accounts SET owner = '{payload}' WHERE id = 15")
    rid = served.pending_id("WHERE id = 15")
    page = signed_in("bob")
    row = _row(page, rid)
    expect(row).to_contain_text("<script>window.pwned = 1</script>")
    expect(row.locator("script, img")).to_have_count(0)
    row.get_by_role("link", name="Review").click()
    sql = page.locator("#review-dialog pre.sql")
    expect(sql).to_contain_text(payload)
    expect(sql.locator("script, img")).to_have_count(0)
    assert page.evaluate("window.pwned") is None
    page.locator("#review-dialog").get_by_role("button", name="Deny").click()
    expect(page.locator(".flash.ok")).to_have_text(f"You denied {rid}.")
    assert page.evaluate("window.pwned") is None
    held.finish()


def _artifact(name: str) -> str:
    folder = ROOT / "test-artifacts"
    folder.mkdir(exist_ok=True)
    return str(folder / name)
