"""Compile the relay's hot modules with mypyc into ``proxy/_speedups/``.

Owns: building C extensions of the modules every relayed byte passes through
(:data:`HOT_MODULES`) from the very sources in this checkout, and the
manifest ``proxy/__init__.py`` checks before it uses them (each module's
SHA-256 and that of every other module of the package, the interpreter's
extension suffix, the mypy version). A source that changed after the build
no longer matches, so the proxy falls back to
the pure-Python module instead of running stale code.

Must not: be needed. The compiled modules are the same code, only faster
(about 3-4 µs less CPU per relayed transaction); when mypy/mypyc or a C
compiler is missing, or the build fails, this prints why and exits 0, and
pgvouch runs as pure Python. ``--check`` exits 1 instead (CI can insist).

Usage: ``python scripts/build_speedups.py [--check]`` (``make install`` runs it).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import json
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET = REPO / "proxy" / "_speedups"
PACKAGES = ("proxy", "policies", "approvals", "config")  # what the hot modules import (type-checked)
HOT_MODULES = ("proxy/wire.py", "proxy/extended.py", "proxy/decide.py", "proxy/client.py",
               "proxy/upstream.py", "proxy/startup.py", "proxy/policy_decider.py")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rebound_exception_names(source: str) -> list[str]:
    """``except A as e`` and ``except B as e`` in one function: mypy accepts it, but mypyc
    types ``e`` by its first binding and the second handler then fails at run time
    (``TypeError: A object expected; got B``). Such code is not compiled."""
    found = []
    for function in ast.walk(ast.parse(source)):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        types: dict[str, set[str]] = {}
        for node in ast.walk(function):
            if isinstance(node, ast.ExceptHandler) and node.name and node.type is not None:
                types.setdefault(node.name, set()).add(ast.unparse(node.type))
        found += [f"{function.name}:{function.lineno} binds {name!r} to {', '.join(sorted(kinds))}"
                  for name, kinds in types.items() if len(kinds) > 1]
    return found


def build(check: bool) -> int:
    hazards = [f"{module} {where}" for module in HOT_MODULES
               for where in rebound_exception_names((REPO / module).read_text())]
    if hazards:
        return skipped("use one name per exception type (mypyc would miscompile): "
                       + "; ".join(hazards), check)
    try:
        mypy_version = importlib.metadata.version("mypy")
    except importlib.metadata.PackageNotFoundError:
        return skipped("mypy (which brings mypyc) is not installed", check)
    with tempfile.TemporaryDirectory(prefix="pgvouch-speedups-") as scratch:
        work = Path(scratch)
        for package in PACKAGES:
            shutil.copytree(REPO / package, work / package,
                            ignore=shutil.ignore_patterns("__pycache__", "_speedups", "*.so"))
        # No pyproject.toml in the scratch directory: mypyc type-checks with its
        # own defaults and builds with setuptools without reading our metadata.
        result = subprocess.run([sys.executable, "-m", "mypyc", *HOT_MODULES], cwd=work,
                                capture_output=True, text=True, check=False)
        if result.returncode != 0:
            tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
            return skipped(f"mypyc failed:\n{tail}", check)
        suffix = sysconfig.get_config_var("EXT_SUFFIX")
        modules = [work / (Path(module).with_suffix("").as_posix() + suffix) for module in HOT_MODULES]
        shared = list(work.glob(f"*__mypyc{suffix}"))
        missing = [str(m.relative_to(work)) for m in modules if not m.exists()]
        if missing or len(shared) != 1:
            return skipped(f"mypyc did not produce {missing or 'its shared library'}", check)
        staging = Path(tempfile.mkdtemp(prefix="_speedups-", dir=TARGET.parent))
        (staging / "proxy").mkdir()
        for module in modules:
            shutil.copy2(module, staging / "proxy" / module.name)
        shutil.copy2(shared[0], staging / shared[0].name)
        manifest = {
            "ext_suffix": suffix,
            "mypy": mypy_version,
            "compiled": [Path(m).with_suffix("").as_posix().replace("/", ".") for m in HOT_MODULES],
            # every module of the package, not only the compiled ones: compiled
            # code may have baked in what it read of its neighbours
            "sources": {path.name: digest(path) for path in sorted((REPO / "proxy").glob("*.py"))
                        if path.name != "__init__.py"},
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if TARGET.exists():
            shutil.rmtree(TARGET)
        staging.rename(TARGET)
    print(f"compiled {len(HOT_MODULES)} relay modules with mypyc {mypy_version} into "
          f"{TARGET.relative_to(REPO)}/")
    return 0


def skipped(why: str, check: bool) -> int:
    print(f"pgvouch: relay modules not compiled ({why}); pgvouch runs as pure Python",
          file=sys.stderr)
    return 1 if check else 0


if __name__ == "__main__":
    sys.exit(build(check="--check" in sys.argv[1:]))
