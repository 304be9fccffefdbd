"""The shipped deployment examples load with the real settings and policy loaders.

Each Kubernetes manifest in ``deploy/kubernetes/`` and ``docker-compose.yml``
is read the way the cluster would lay it out: the pgvouch config and policies
are written where the ConfigMap (or the compose bind mount) puts them, the
container's environment is built from its Secret references, and then
``config.settings.load_settings`` and ``policies.loader.load_policies`` must
accept them. Ports, probes and Services must agree with the config, and a
Deployment of more than one pgvouch must use a PostgreSQL store.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from config.settings import Settings, load_settings
from policies.loader import load_policies

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
COMPOSE = ROOT / "docker-compose.yml"


@dataclass
class Pgvouch:
    """One pgvouch container of an example, with its config laid out on disk."""

    where: str
    config: Path
    env: dict[str, str]
    container: dict[str, Any]
    replicas: int


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _config_path(args: list[str]) -> PurePosixPath:
    assert "--config" in args, args
    return PurePosixPath(args[args.index("--config") + 1])


def _container_env(container: dict[str, Any], secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(secrets[source["secretRef"]["name"]])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = secrets[ref["name"]][ref["key"]]
    return env


def _kubernetes_pgvouch(manifest: Path, root: Path) -> Iterator[Pgvouch]:
    docs = _documents(manifest)
    config_maps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    secrets = {d["metadata"]["name"]: d.get("stringData", {}) for d in docs if d["kind"] == "Secret"}
    for deployment in (d for d in docs if d["kind"] == "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in pod.get("initContainers", []) + pod["containers"]:
            if "--config" not in container.get("args", []):
                continue
            name = f"{manifest.name}/{deployment['metadata']['name']}/{container['name']}"
            config = _config_path(container["args"])
            for mount in container.get("volumeMounts", []):
                source = volumes[mount["name"]]["configMap"]
                data = config_maps[source["name"]]
                items = source.get("items") or [{"key": key, "path": key} for key in data]
                for item in items:
                    target = root / name / mount["mountPath"].lstrip("/") / item["path"]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text(data[item["key"]])
            yield Pgvouch(name, root / name / str(config).lstrip("/"),
                          _container_env(container, secrets), container,
                          int(deployment["spec"].get("replicas", 1)))


def _load(pgvouch: Pgvouch, monkeypatch: pytest.MonkeyPatch) -> Settings:
    assert pgvouch.config.is_file(), f"{pgvouch.where}: nothing is mounted at the --config path"
    for key, value in pgvouch.env.items():
        monkeypatch.setenv(key, value)
    settings = load_settings(pgvouch.config)
    assert settings.policies is not None, f"{pgvouch.where}: no policies configured"
    directory = {name: user.groups for name, user in settings.users.items()}
    assert load_policies(settings.policies, users=directory).policies
    for resource in settings.resources.values():  # every upstream password is provided
        for account in resource.accounts.values():
            assert account.password(), f"{pgvouch.where}: no password for account {account.name}"
    return settings


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_kubernetes_examples_load(manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    found = list(_kubernetes_pgvouch(manifest, tmp_path))
    assert found, f"{manifest.name}: no pgvouch container"
    docs = _documents(manifest)
    for pgvouch in found:
        settings = _load(pgvouch, monkeypatch)
        if pgvouch.replicas > 1:  # several replicas must share one store
            assert settings.store.startswith("postgresql://"), pgvouch.where
        ports = {p["name"]: p["containerPort"] for p in pgvouch.container.get("ports", [])}
        assert ports.get("http", ports.get("pgvouch-api")) == settings.api.port
        assert settings.api.host == "0.0.0.0"  # the kubelet probes the pod IP
        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            check = pgvouch.container[probe]["httpGet"]
            assert check["path"] == path
            assert ports[check["port"]] == settings.api.port
        if "postgres" in ports:
            assert ports["postgres"] == settings.listen.port
        for service in (d for d in docs if d["kind"] == "Service"):
            for port in service["spec"]["ports"]:
                assert port["targetPort"] in ports, f"{service['metadata']['name']}: {port}"


def test_the_replicas_example_is_two_pgvouch_behind_a_service() -> None:
    docs = _documents(ROOT / "deploy" / "kubernetes" / "replicas.yaml")
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    service = next(d for d in docs if d["kind"] == "Service")
    assert deployment["spec"]["replicas"] == 2
    assert {p["port"] for p in service["spec"]["ports"]} == {6432, 8432}
    assert service["spec"]["selector"] == deployment["spec"]["template"]["metadata"]["labels"]


def test_the_sidecar_example_keeps_the_proxy_inside_the_pod(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = ROOT / "deploy" / "kubernetes" / "sidecar.yaml"
    (pgvouch,) = list(_kubernetes_pgvouch(manifest, tmp_path))
    settings = _load(pgvouch, monkeypatch)
    assert settings.listen.host == "127.0.0.1"
    deployment = next(d for d in _documents(manifest) if d["kind"] == "Deployment")
    app = deployment["spec"]["template"]["spec"]["containers"][0]
    url = next(e["value"] for e in app["env"] if e["name"] == "DATABASE_URL")
    assert f"@127.0.0.1:{settings.listen.port}/" in url
    user = url.split("://", 1)[1].split(":", 1)[0]
    assert settings.users[user].password_verifier is not None


def test_the_compose_example_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    replicas = {name: s for name, s in services.items() if "build" in s}
    assert len(replicas) == 2
    published: set[str] = set()
    for name, service in replicas.items():
        config = _config_path(service["command"])
        (mount,) = [v for v in service["volumes"] if str(config).startswith(v.split(":")[1] + "/")]
        source, target = mount.split(":")[:2]
        local = (ROOT / source / config.relative_to(target)).resolve()
        assert local.is_relative_to(ROOT / "deploy"), local
        settings = _load(Pgvouch(f"compose/{name}", local, dict(service["environment"]), service, 2),
                         monkeypatch)
        assert settings.store.startswith("postgresql://")
        host = settings.store.split("@", 1)[1].split(":", 1)[0]
        assert host in services  # the store is a compose service
        assert all(resource.host in services for resource in settings.resources.values())
        for port in service["ports"]:
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
            published.add(port.split(":")[1])
    assert len(published) == 4  # each replica on its own host ports
    upstream = services["upstream"]
    assert any("upstream-init.sql" in v for v in upstream["volumes"])
    assert "ports" not in upstream and "ports" not in services["store"]

