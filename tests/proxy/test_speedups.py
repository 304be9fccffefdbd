"""The compiled relay modules: used when current, never when a source changed since the build.

``make install`` builds them (scripts/build_speedups.py); ``proxy/__init__.py``
decides at import whether to use them. These tests import the package in a
fresh interpreter, from this checkout or from a copy whose sources differ.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUILT = REPO / "proxy" / "_speedups"
sys.path.insert(0, str(REPO / "scripts"))
from build_speedups import HOT_MODULES, rebound_exception_names  # noqa: E402

PROBE = "import proxy, proxy.client; print(proxy.SPEEDUPS); print(proxy.client.__file__)"


def _probe(cwd: Path, **env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k != "PGVOUCH_PURE_PYTHON"}
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env={**clean, **env},
                            capture_output=True, text=True, check=True, timeout=60)
    return result.stdout.splitlines()


def test_make_install_built_them_and_the_proxy_uses_them() -> None:
    manifest = json.loads((BUILT / "manifest.json").read_text())
    assert "proxy.client" in manifest["compiled"]
    status, client = _probe(REPO)
    assert status.startswith("on (") and "proxy.client" in status
    assert client.endswith(".so") and "_speedups" in client


def test_pure_python_on_request() -> None:
    status, client = _probe(REPO, PGVOUCH_PURE_PYTHON="1")
    assert status.startswith("off (PGVOUCH_PURE_PYTHON")
    assert client.endswith("proxy/client.py")


def _copy(tmp_path: Path) -> Path:
    copy = tmp_path / "checkout"
    shutil.copytree(REPO / "proxy", copy / "proxy", ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def test_an_edited_source_runs_as_written(tmp_path: Path) -> None:
    copy = _copy(tmp_path)
    assert _probe(copy)[0].startswith("on (")  # the copy's build matches its sources
    source = copy / "proxy" / "client.py"
    source.write_text(source.read_text() + "\n# edited after the build\n")
    status, client = _probe(copy)
    assert status == "off (client.py changed since the build: run make install)"
    assert client.endswith("proxy/client.py")


def test_a_neighbouring_module_counts_too(tmp_path: Path) -> None:
    copy = _copy(tmp_path)
    neighbour = copy / "proxy" / "sqlstate.py"
    original = neighbour.read_text()
    neighbour.write_text(original + "\n")
    assert _probe(copy)[0] == "off (sqlstate.py changed since the build: run make install)"
    neighbour.write_text(original)
    assert _probe(copy)[0].startswith("on (")
    (copy / "proxy" / "extra.py").write_text("")
    assert _probe(copy)[0] == "off (modules were added or removed since the build: run make install)"


def test_a_build_for_another_python_is_ignored(tmp_path: Path) -> None:
    copy = _copy(tmp_path)
    manifest_path = copy / "proxy" / "_speedups" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["ext_suffix"] = ".cpython-399-x86_64-linux-gnu.so"
    manifest_path.write_text(json.dumps(manifest))
    status, client = _probe(copy)
    assert status == "off (built for another Python)"
    assert client.endswith("proxy/client.py")


def test_no_build_no_problem(tmp_path: Path) -> None:
    copy = _copy(tmp_path)
    shutil.rmtree(copy / "proxy" / "_speedups")
    assert _probe(copy) == ["off (not built)", str(copy / "proxy" / "client.py")]


def test_the_compiled_modules_avoid_what_mypyc_miscompiles() -> None:
    assert rebound_exception_names("def f():\n try: g()\n except A as e: h(e)\n"
                                   " try: g()\n except B as e: h(e)\n") == ["f:1 binds 'e' to A, B"]
    for module in HOT_MODULES:
        assert rebound_exception_names((REPO / module).read_text()) == [], module
