"""The pgvouch configuration: schema, defaults and loader.

Owns: the typed settings (listen address, API, TLS, client auth, resources
with their accounts, users) and reading them from YAML with file:line errors.
Secrets (account passwords) are resolved lazily from the environment or a
file at connect time, so they are never part of the settings objects'
``repr`` and never logged.

Must not: open sockets, start servers, or evaluate policies.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from config.yamlnodes import ConfigError, Mapping, Node, load_file, load_text
from proxy.scram import ScramError, parse_verifier

log = logging.getLogger("pgvouch.config")

SSLMODES = ("disable", "require", "verify-full")
CLIENT_AUTH = ("scram", "trust")
LOG_FORMATS = ("plain", "json")


@dataclass(frozen=True)
class Listen:
    host: str = "127.0.0.1"
    port: int = 6432


@dataclass(frozen=True)
class Api:
    host: str = "127.0.0.1"
    port: int = 8432
    enabled: bool = True
    public_url: str | None = None  # how people reach the API and Activity Queue (links in mail, Slack)

    def base_url(self) -> str:
        """The Activity Queue's address for links: ``public_url``, else the listen address."""
        if self.public_url:
            return self.public_url.rstrip("/")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


@dataclass(frozen=True)
class Tls:
    cert_file: str
    key_file: str


@dataclass(frozen=True)
class Account:
    name: str
    user: str
    password_env: str | None = None
    password_file: str | None = None
    allow: tuple[str, ...] | None = None  # None: anyone who may use the resource

    def password(self) -> str | None:
        """The upstream password, read at connect time (never cached in logs)."""
        if self.password_env is not None:
            value = os.environ.get(self.password_env)
            if value is None:
                raise ConfigError(
                    f"account {self.name!r}: environment variable {self.password_env} is not set"
                )
            return value
        if self.password_file is not None:
            try:
                return Path(self.password_file).read_text(encoding="utf-8").rstrip("\r\n")
            except OSError as exc:
                raise ConfigError(
                    f"account {self.name!r}: cannot read password_file: {exc.strerror}"
                ) from None
        return None


@dataclass(frozen=True)
class Resource:
    name: str
    host: str
    port: int
    database: str
    default_account: str
    accounts: dict[str, Account]
    sslmode: str = "disable"
    ca_file: str | None = None
    connect_timeout: float = 10.0


@dataclass(frozen=True)
class User:
    name: str
    groups: tuple[str, ...] = ()
    password_verifier: str | None = field(default=None, repr=False)
    api_token_sha256: str | None = field(default=None, repr=False)
    roles: tuple[str, ...] = ()
    email: str | None = None
    slack_id: str | None = None  # Slack member id (U0123ABCD) for votes cast from Slack


@dataclass(frozen=True)
class Limits:
    max_client_connections: int = 1000
    auth_timeout: float = 30.0
    drain_timeout: float = 30.0
    max_message_size: int = 64 * 1024 * 1024


@dataclass(frozen=True)
class HoldSettings:
    mode: str = "wait"  # wait | retry
    wait_timeout: float = 600.0  # how long a held client waits for a decision
    approved_ttl: float = 3600.0  # how long an approved statement may be re-sent
    expires_after: float = 8 * 3600.0  # a pending request expires after this
    heartbeat: float = 60.0  # NOTICE interval while waiting
    # A held statement re-reads its request at least this often (the fallback when a change on
    # another replica is not announced by NOTIFY); the expiry sweep runs this often.
    poll_interval: float = 2.0
    sweep_interval: float = 5.0


@dataclass(frozen=True)
class PreviewSettings:
    """``preview``: the impact preview (EXPLAIN, never ANALYZE) of held statements."""

    enabled: bool = True
    stale_after: float = 30 * 60.0  # refreshed before an approval is accepted once this old
    timeout: float = 5.0  # statement_timeout of the EXPLAIN (the connection has its own limit)


@dataclass(frozen=True)
class FunctionSettings:
    """``functions``: each resource's functions and their volatility, for the classifier.

    With ``volatility`` on (the default), the proxy reads ``pg_proc`` of each
    resource before its first session there and every ``refresh`` after
    that: a read that calls a volatile function outside ``pg_catalog`` and
    ``information_schema``, or a function the last read did not see, is a
    write. ``user: all`` counts every function outside those schemas, not
    only volatile ones (PostgreSQL lets a STABLE function call a VOLATILE
    one). Only takes effect with ``policies``.
    """

    volatility: bool = True
    refresh: float = 60.0
    user: str = "volatile"  # volatile | all


def _secret_from_env(variable: str, owner: str) -> str:
    value = os.environ.get(variable)
    if not value:
        raise ConfigError(f"{owner}: environment variable {variable} is not set")
    return value


@dataclass(frozen=True)
class Webhook:
    url: str
    secret_env: str
    events: tuple[str, ...] = ()  # empty: every event

    def secret(self) -> str:
        return _secret_from_env(self.secret_env, f"webhook {self.url}")


@dataclass(frozen=True)
class SlackSettings:
    """``notify.slack``: an incoming webhook for messages, a signing secret for button clicks."""

    webhook_url_env: str
    signing_secret_env: str
    channel: str | None = None
    response_url_hosts: tuple[str, ...] = ("hooks.slack.com",)

    def webhook_url(self) -> str:
        return _secret_from_env(self.webhook_url_env, "notify.slack")

    def signing_secret(self) -> str:
        return _secret_from_env(self.signing_secret_env, "notify.slack")


@dataclass(frozen=True)
class EmailSettings:
    """``notify.email``: the SMTP relay pgvouch sends notifications through."""

    smtp_host: str
    sender: str  # the From address (``from`` in YAML)
    smtp_port: int = 587
    starttls: bool = True
    username_env: str | None = None
    password_env: str | None = None
    ca_file: str | None = None  # trust this CA for STARTTLS instead of the system's
    announce_to: tuple[str, ...] = ()  # users / group:NAME mailed announcements, besides owners
    timeout: float = 10.0

    def credentials(self) -> tuple[str, str] | None:
        if self.username_env is None or self.password_env is None:
            return None
        return (_secret_from_env(self.username_env, "notify.email"),
                _secret_from_env(self.password_env, "notify.email"))


@dataclass(frozen=True)
class Integration:
    name: str
    secret_env: str
    approvers: tuple[str, ...]  # user names or group:NAME it may speak for

    def secret(self) -> str:
        return _secret_from_env(self.secret_env, f"integration {self.name}")


@dataclass(frozen=True)
class Settings:
    listen: Listen
    api: Api
    tls: Tls | None
    client_auth: str
    resources: dict[str, Resource]
    users: dict[str, User]
    limits: Limits
    log_format: str = "plain"
    log_level: str = "INFO"
    policies: str | None = None
    source: str = "<memory>"
    store: str = "sqlite:///pgvouch.db"
    hold: HoldSettings = field(default_factory=HoldSettings)
    audit_reads: bool = False
    webhooks: tuple[Webhook, ...] = ()
    integrations: tuple[Integration, ...] = ()
    preview: PreviewSettings = field(default_factory=PreviewSettings)
    functions: FunctionSettings = field(default_factory=FunctionSettings)
    slack: SlackSettings | None = None
    email: EmailSettings | None = None
    workers: int = 1  # relay processes behind the listen address (see proxy.supervisor)
    pin_workers: bool = False  # worker N runs only on the Nth CPU this process may use

    def groups_of(self, user: str) -> tuple[str, ...]:
        entry = self.users.get(user)
        return entry.groups if entry else ()


def _listen(node: Node, default_port: int) -> tuple[str, int]:
    m = node.mapping(("host", "port"))
    host = m["host"].str() if "host" in m else "127.0.0.1"
    port = m["port"].int(minimum=0, maximum=65535) if "port" in m else default_port
    return host, port


def _account(node: Node) -> Account:
    m = node.mapping(("name", "user", "password_env", "password_file", "allow"), ("name", "user"))
    if "password_env" in m and "password_file" in m:
        raise m.error("give password_env or password_file, not both")
    allow = tuple(m["allow"].str_list()) if "allow" in m else None
    return Account(
        name=m["name"].str(),
        user=m["user"].str(),
        password_env=m["password_env"].str() if "password_env" in m else None,
        password_file=m["password_file"].str() if "password_file" in m else None,
        allow=allow,
    )


def _resource(node: Node) -> Resource:
    m = node.mapping(
        (
            "name", "host", "port", "database", "sslmode", "ca_file",
            "default_account", "accounts", "connect_timeout",
        ),
        ("name", "host", "database", "accounts"),
    )
    name = m["name"].str()
    if "/" in name:
        raise m["name"].error("a resource name must not contain '/'")
    accounts: dict[str, Account] = {}
    for item in m["accounts"].items():
        account = _account(item)
        if account.name in accounts:
            raise item.error(f"duplicate account {account.name!r}")
        accounts[account.name] = account
    if not accounts:
        raise m["accounts"].error("a resource needs at least one account")
    default = m["default_account"].str() if "default_account" in m else next(iter(accounts))
    if default not in accounts:
        raise m["default_account"].error(f"no account named {default!r} in this resource")
    sslmode = m["sslmode"].choice(SSLMODES) if "sslmode" in m else "disable"
    ca_file = m["ca_file"].str() if "ca_file" in m else None
    if sslmode == "verify-full" and ca_file is None:
        raise m.error("sslmode verify-full needs ca_file")
    return Resource(
        name=name,
        host=m["host"].str(),
        port=m["port"].int(minimum=1, maximum=65535) if "port" in m else 5432,
        database=m["database"].str(),
        default_account=default,
        accounts=accounts,
        sslmode=sslmode,
        ca_file=ca_file,
        connect_timeout=m["connect_timeout"].duration() if "connect_timeout" in m else 10.0,
    )


def _user(node: Node) -> User:
    m = node.mapping(
        ("name", "groups", "password_verifier", "api_token_sha256", "roles", "email", "slack_id"),
        ("name",),
    )
    verifier = m["password_verifier"].str() if "password_verifier" in m else None
    if verifier is not None:
        try:
            parse_verifier(verifier)
        except ScramError:
            raise m["password_verifier"].error(
                "password_verifier must be a SCRAM-SHA-256 verifier "
                "(make one with `pgvouch user hash`)"
            ) from None
    token = m["api_token_sha256"].str() if "api_token_sha256" in m else None
    if token is not None and (len(token) != 64 or any(c not in "0123456789abcdef" for c in token)):
        raise m["api_token_sha256"].error("api_token_sha256 must be 64 lowercase hex digits")
    email = m["email"].str() if "email" in m else None
    if email is not None and not _EMAIL.fullmatch(email):
        raise m["email"].error(f"not an email address: {email!r}")
    slack_id = m["slack_id"].str() if "slack_id" in m else None
    if slack_id is not None and not _SLACK_ID.fullmatch(slack_id):
        raise m["slack_id"].error(f"a slack_id is a Slack member id such as U0123ABCD, not {slack_id!r}")
    return User(
        name=m["name"].str(),
        groups=tuple(m["groups"].str_list()) if "groups" in m else (),
        password_verifier=verifier,
        api_token_sha256=token,
        roles=tuple(m["roles"].str_list()) if "roles" in m else (),
        email=email,
        slack_id=slack_id,
    )


_EMAIL = re.compile(r"[^@\s<>,;\"]+@[^@\s<>,;\"]+")
_SLACK_ID = re.compile(r"[UW][A-Z0-9]{2,31}")


def _check_unique_slack_ids(node: Node | None, users: dict[str, User]) -> None:
    owners: dict[str, str] = {}
    for item, user in zip(node.items() if node is not None else [], users.values(), strict=False):
        if user.slack_id is None:
            continue
        if user.slack_id in owners:
            raise item.error(f"slack_id {user.slack_id} is already {owners[user.slack_id]}'s")
        owners[user.slack_id] = user.name


def _limits(node: Node | None) -> Limits:
    if node is None:
        return Limits()
    m = node.mapping(
        ("max_client_connections", "auth_timeout", "drain_timeout", "max_message_size")
    )
    d = Limits()
    return Limits(
        max_client_connections=m["max_client_connections"].int(minimum=1)
        if "max_client_connections" in m
        else d.max_client_connections,
        auth_timeout=m["auth_timeout"].duration() if "auth_timeout" in m else d.auth_timeout,
        drain_timeout=m["drain_timeout"].duration() if "drain_timeout" in m else d.drain_timeout,
        max_message_size=m["max_message_size"].int(minimum=1024, maximum=1 << 30)
        if "max_message_size" in m
        else d.max_message_size,
    )


TOP_KEYS = (
    "listen", "api", "tls", "client_auth", "resources", "users", "limits", "log", "policies",
    "store", "store_env", "hold", "audit", "notify", "integrations", "preview", "functions",
    "workers", "pin_workers",
)
EVENT_TYPES = (
    "request.created", "request.voted", "request.step_completed", "request.approved",
    "request.denied", "request.cancelled", "request.expired", "request.executing",
    "request.executed", "request.failed", "request.revoked", "request.ended", "request.previewed",
)


def _hold(node: Node | None) -> HoldSettings:
    d = HoldSettings()
    if node is None:
        return d
    m = node.mapping(("mode", "wait_timeout", "approved_ttl", "expires_after", "heartbeat",
                      "poll_interval", "sweep_interval"))
    intervals: dict[str, float] = {}
    for key in ("poll_interval", "sweep_interval"):
        if key in m:
            intervals[key] = m[key].duration()
            if not 0 < intervals[key] <= 3600:
                raise m[key].error(f"{key} must be a duration between 1ms and 1h, such as 2s")
    return HoldSettings(
        **intervals,
        mode=m["mode"].choice(("wait", "retry")) if "mode" in m else d.mode,
        wait_timeout=m["wait_timeout"].duration() if "wait_timeout" in m else d.wait_timeout,
        approved_ttl=m["approved_ttl"].duration() if "approved_ttl" in m else d.approved_ttl,
        expires_after=m["expires_after"].duration() if "expires_after" in m else d.expires_after,
        heartbeat=m["heartbeat"].duration() if "heartbeat" in m else d.heartbeat,
    )


def _duration_within(m: Mapping, key: str, default: float, valid: Callable[[float], bool],
                     message: str) -> float:
    """``m[key]`` as a duration (``default`` when absent), refused with ``message`` unless valid."""
    if key not in m:
        return default
    value = m[key].duration()
    if not valid(value):
        raise m[key].error(message)
    return value


def _preview(node: Node | None) -> PreviewSettings:
    d = PreviewSettings()
    if node is None:
        return d
    m = node.mapping(("enabled", "stale_after", "timeout"))
    stale_after = _duration_within(m, "stale_after", d.stale_after, lambda v: v > 0,
                                   "stale_after must be a positive duration such as 30m")
    timeout = _duration_within(m, "timeout", d.timeout, lambda v: 0 < v <= 300,
                               "timeout must be a duration between 1ms and 5m, such as 5s")
    return PreviewSettings(enabled=m["enabled"].bool() if "enabled" in m else d.enabled,
                           stale_after=stale_after, timeout=timeout)


def _functions(node: Node | None) -> FunctionSettings:
    d = FunctionSettings()
    if node is None:
        return d
    m = node.mapping(("volatility", "refresh", "user"))
    refresh = _duration_within(m, "refresh", d.refresh, lambda v: 1 <= v <= 24 * 3600,
                               "refresh must be a duration between 1s and 24h, such as 60s")
    return FunctionSettings(
        volatility=m["volatility"].bool() if "volatility" in m else d.volatility, refresh=refresh,
        user=m["user"].choice(("volatile", "all")) if "user" in m else d.user,
    )


def _webhooks(node: Node | None) -> tuple[Webhook, ...]:
    if node is None:
        return ()
    m = node.mapping(("webhooks", "slack", "email"))
    hooks = []
    for item in m["webhooks"].items() if "webhooks" in m else []:
        h = item.mapping(("url", "secret_env", "events"), ("url", "secret_env"))
        url = h["url"].str()
        if not url.startswith(("http://", "https://")):
            raise h["url"].error("a webhook url must start with http:// or https://")
        events = tuple(h["events"].str_list()) if "events" in h else ()
        for event, item_node in zip(events, h["events"].items() if "events" in h else [],
                                     strict=False):
            if event not in EVENT_TYPES:
                raise item_node.error(f"unknown event {event!r}")
        hooks.append(Webhook(url, h["secret_env"].str(), events))
    return tuple(hooks)


def _slack(notify: Node | None) -> SlackSettings | None:
    node = None if notify is None else notify.mapping(("webhooks", "slack", "email")).get("slack")
    if node is None:
        return None
    m = node.mapping(("webhook_url_env", "signing_secret_env", "channel", "response_url_hosts"),
                     ("webhook_url_env", "signing_secret_env"))
    hosts = tuple(m["response_url_hosts"].str_list()) if "response_url_hosts" in m else None
    if hosts is not None and not hosts:
        raise m["response_url_hosts"].error("name at least one host (Slack's is hooks.slack.com)")
    return SlackSettings(
        webhook_url_env=m["webhook_url_env"].str(),
        signing_secret_env=m["signing_secret_env"].str(),
        channel=m["channel"].str() if "channel" in m else None,
        response_url_hosts=hosts or SlackSettings.response_url_hosts,
    )


def _email(notify: Node | None) -> EmailSettings | None:
    node = None if notify is None else notify.mapping(("webhooks", "slack", "email")).get("email")
    if node is None:
        return None
    m = node.mapping(
        ("smtp_host", "smtp_port", "starttls", "username_env", "password_env", "from", "ca_file",
         "announce_to", "timeout"),
        ("smtp_host", "from"),
    )
    if ("username_env" in m) != ("password_env" in m):
        raise m.error("give both username_env and password_env, or neither")
    sender = m["from"].str()
    if not _EMAIL.search(sender) or any(c in sender for c in "\r\n"):
        raise m["from"].error(f"from must be an address such as pgvouch@example.com, not {sender!r}")
    starttls = m["starttls"].bool() if "starttls" in m else True
    host = m["smtp_host"].str()
    if not starttls and "username_env" in m and not _loopback(host):
        raise m["starttls"].error(
            f"starttls: false with username_env/password_env would send the SMTP password to "
            f"{host} in clear text; use starttls: true (or a relay on this host)")
    return EmailSettings(
        smtp_host=host,
        sender=sender,
        smtp_port=m["smtp_port"].int(minimum=1, maximum=65535) if "smtp_port" in m
        else 587 if starttls else 25,
        starttls=starttls,
        username_env=m["username_env"].str() if "username_env" in m else None,
        password_env=m["password_env"].str() if "password_env" in m else None,
        ca_file=m["ca_file"].str() if "ca_file" in m else None,
        announce_to=tuple(m["announce_to"].str_list()) if "announce_to" in m else (),
        timeout=m["timeout"].duration() if "timeout" in m else 10.0,
    )


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _integrations(node: Node | None) -> tuple[Integration, ...]:
    if node is None:
        return ()
    result = []
    for item in node.items():
        m = item.mapping(("name", "secret_env", "approvers"), ("name", "secret_env", "approvers"))
        result.append(Integration(m["name"].str(), m["secret_env"].str(),
                                  tuple(m["approvers"].str_list())))
    return tuple(result)


def _store(m: Mapping) -> str:
    """``store``, or the URL in the environment variable ``store_env`` names (secrets stay out of files)."""
    if "store" in m and "store_env" in m:
        raise m["store_env"].error("give store or store_env, not both")
    if "store_env" in m:
        variable = m["store_env"].str()
        store = os.environ.get(variable, "")
        if not store:
            raise m["store_env"].error(f"store_env: the environment variable {variable} is not set")
        where = m["store_env"]
    else:
        if "store" not in m:
            return "sqlite:///pgvouch.db"
        store, where = m["store"].str(), m["store"]
    if not store.startswith(("sqlite://", "postgresql://", "postgres://")):
        raise where.error("store must be sqlite:///PATH or postgresql://...")
    return store


MAX_WORKERS = 64


def available_cpus(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max"),
                   cfs: Path = Path("/sys/fs/cgroup/cpu")) -> int:
    """The CPUs this process may use: its affinity, capped by a cgroup CPU quota (v2
    ``cpu.max``, else v1 ``cpu.cfs_quota_us``): a container limited to 2 CPUs on a 64-core
    host gets 2."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = (cfs / "cpu.cfs_quota_us").read_text().strip()
            period = (cfs / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return cpus
    if not quota.isdigit() or not period.isdigit() or int(period) <= 0:
        return cpus  # "max", or -1 (v1): no quota
    return max(1, min(cpus, -(-int(quota) // int(period))))


def _workers(m: Mapping, policies: bool, store: str) -> int:
    """``workers``: a number, or ``auto`` for one per CPU this process may run on."""
    if "workers" not in m:
        return 1
    node = m["workers"]
    if node.node.tag == "tag:yaml.org,2002:str" and node.str() == "auto":
        workers = min(MAX_WORKERS, available_cpus())
    else:
        workers = node.int(minimum=1, maximum=MAX_WORKERS)
    if workers > 1 and policies and not store.startswith(("postgresql://", "postgres://")):
        raise node.error(
            "workers above 1 with policies need a PostgreSQL store (store: postgresql://...): "
            "the workers share approvals, holds and grants the way replicas do, and a SQLite "
            "store belongs to one process")
    return workers


def settings_from_node(root: Node) -> Settings:
    """Validate a parsed config document and build :class:`Settings`."""
    m: Mapping = root.mapping(TOP_KEYS, ("resources",))
    listen_host, listen_port = _listen(m["listen"], 6432) if "listen" in m else ("127.0.0.1", 6432)
    api = Api()
    if "api" in m:
        api_node = m["api"]
        if api_node.node.tag == "tag:yaml.org,2002:bool":
            api = Api(enabled=api_node.bool())
        else:
            am = api_node.mapping(("host", "port", "public_url"))
            host = am["host"].str() if "host" in am else "127.0.0.1"
            port = am["port"].int(minimum=0, maximum=65535) if "port" in am else 8432
            public_url = am["public_url"].str() if "public_url" in am else None
            if public_url is not None and not public_url.startswith(("http://", "https://")):
                raise am["public_url"].error("public_url must start with http:// or https://")
            api = Api(host=host, port=port, public_url=public_url)
    tls = None
    if "tls" in m:
        t = m["tls"].mapping(("cert_file", "key_file"), ("cert_file", "key_file"))
        tls = Tls(cert_file=t["cert_file"].str(), key_file=t["key_file"].str())
    client_auth = m["client_auth"].choice(CLIENT_AUTH) if "client_auth" in m else "scram"
    resources: dict[str, Resource] = {}
    for item in m["resources"].items():
        resource = _resource(item)
        if resource.name in resources:
            raise item.error(f"duplicate resource {resource.name!r}")
        resources[resource.name] = resource
    if not resources:
        raise m["resources"].error("at least one resource is needed")
    users: dict[str, User] = {}
    if "users" in m:
        for item in m["users"].items():
            user = _user(item)
            if user.name in users:
                raise item.error(f"duplicate user {user.name!r}")
            users[user.name] = user
    _check_unique_slack_ids(m.get("users"), users)
    log_format, log_level = "plain", "INFO"
    if "log" in m:
        lm = m["log"].mapping(("format", "level"))
        if "format" in lm:
            log_format = lm["format"].choice(LOG_FORMATS)
        if "level" in lm:
            log_level = lm["level"].choice(("DEBUG", "INFO", "WARNING", "ERROR"))
    policies = None
    if "policies" in m:
        # Relative paths are relative to the config file, so a config and its
        # policy directory can move together (Docker, Kubernetes ConfigMaps).
        policies = str((Path(root.file).parent / m["policies"].str()).resolve())
    store = _store(m)
    workers = _workers(m, policies is not None, store)
    audit_reads = False
    if "audit" in m:
        am = m["audit"].mapping(("reads",))
        audit_reads = am["reads"].bool() if "reads" in am else False
    return Settings(
        store=store,
        hold=_hold(m.get("hold")),
        preview=_preview(m.get("preview")),
        functions=_functions(m.get("functions")),
        audit_reads=audit_reads,
        webhooks=_webhooks(m.get("notify")),
        slack=_slack(m.get("notify")),
        email=_email(m.get("notify")),
        integrations=_integrations(m.get("integrations")),
        listen=Listen(listen_host, listen_port),
        api=api,
        tls=tls,
        client_auth=client_auth,
        resources=resources,
        users=users,
        limits=_limits(m.get("limits")),
        log_format=log_format,
        log_level=log_level,
        policies=policies,
        source=root.file,
        workers=workers,
        pin_workers=m["pin_workers"].bool() if "pin_workers" in m else False,
    )


def load_settings(path: str | Path, text: str | None = None) -> Settings:
    """Load and validate a config file (or ``text``, its contents as already read);
    raises :class:`ConfigError` with file:line."""
    settings = settings_from_node(load_file(path) if text is None else load_text(text, str(path)))
    if settings.client_auth == "trust":
        log.warning(
            "client_auth is 'trust': any configured user can connect WITHOUT a password. "
            "Use this only for demos."
        )
    return settings
