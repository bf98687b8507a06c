"""The package's shape: no import cycles between densevlm modules or packages (tools/check_imports.py)."""

from __future__ import annotations

import importlib.util
import io
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# None allowed: a cycle found here is mended by moving code, not listed.
KNOWN_CYCLES: list[frozenset[str]] = []


def _checker():
    spec = importlib.util.spec_from_file_location("check_imports", REPO / "tools" / "check_imports.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_no_import_cycles_counting_imports_inside_functions():
    out = io.StringIO()
    cycles = _checker().check(REPO, out=out, allowed=KNOWN_CYCLES)
    assert cycles == [], out.getvalue()


def test_the_checker_finds_a_cycle_hidden_in_a_function(tmp_path):
    pkg = tmp_path / "densevlm"
    (pkg / "a").mkdir(parents=True)
    (pkg / "b").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("from densevlm.b.y import g\n")
    (pkg / "b" / "__init__.py").write_text("")
    (pkg / "b" / "y.py").write_text("def g():\n    from densevlm.a import f\n    return f\n")
    out = io.StringIO()
    cycles = _checker().check(tmp_path, out=out)
    assert cycles == [["densevlm.a", "densevlm.b.y"], ["densevlm.a", "densevlm.b"]]
    report = out.getvalue()
    assert "densevlm/b/y.py:2 (inside a function)" in report and "densevlm/a/__init__.py:1" in report
