"""pgvouch's proxy: the wire protocol, sessions, the server and the CLI.

Owns: choosing, once at import, between the pure-Python relay modules and
their mypyc-compiled builds in ``proxy/_speedups/`` (made by
``scripts/build_speedups.py``, which ``make install`` runs). The compiled
builds are used only when their manifest matches this interpreter and the
SHA-256 of every module of this package as it was at the build, so an
edited source always runs as written (pure Python) until the next build.
``PGVOUCH_PURE_PYTHON=1`` turns them off. :data:`SPEEDUPS` says which is in
use, for the startup log.

Must not: import anything of pgvouch's own (this runs before every submodule).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_BUILT = _HERE / "_speedups"


def _speedups() -> str:
    """Put the compiled modules first on this package's path if they are current; say why not."""
    if os.environ.get("PGVOUCH_PURE_PYTHON"):
        return "off (PGVOUCH_PURE_PYTHON is set)"
    try:
        manifest = json.loads((_BUILT / "manifest.json").read_text())
        modules: list[str] = manifest["compiled"]
        sources: dict[str, str] = manifest["sources"]
        if manifest["ext_suffix"] != sysconfig.get_config_var("EXT_SUFFIX"):
            return "off (built for another Python)"
        current = {path.name for path in _HERE.glob("*.py")} - {"__init__.py"}
        if current != set(sources):
            return "off (modules were added or removed since the build: run make install)"
        for name, expected in sources.items():
            if hashlib.sha256((_HERE / name).read_bytes()).hexdigest() != expected:
                return f"off ({name} changed since the build: run make install)"
    except FileNotFoundError:
        return "off (not built)"
    except (OSError, ValueError, KeyError, TypeError):
        return "off (unreadable build manifest)"
    sys.path.append(str(_BUILT))  # mypyc's shared runtime module (a unique, hashed name)
    __path__.insert(0, str(_BUILT / "proxy"))
    return "on (" + ", ".join(sorted(modules)) + ")"


SPEEDUPS = _speedups()
