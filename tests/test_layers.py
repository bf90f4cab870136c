"""The package's import contract (pyproject.toml, [tool.importlinter]), checked by import-linter: the layers
import downward only, no import cycle exists (imports inside functions included), and no module imports
another package's private module. A synthetic package shows the cycle check sees a function-level import."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _lint(cwd: Path, config: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports") or pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    env = None
    if pythonpath is not None:
        import os

        env = dict(os.environ, PYTHONPATH=str(pythonpath))
    return subprocess.run([exe, "--config", str(config)], cwd=cwd, capture_output=True, text=True, env=env)


def test_qedit_keeps_its_import_contracts():
    done = _lint(ROOT, ROOT / "pyproject.toml")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "3 kept, 0 broken" in done.stdout


def test_a_cycle_through_a_function_level_import_is_caught(tmp_path):
    pkg = tmp_path / "cyc"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text("def f():\n    from cyc import high\n    return high\n")
    (pkg / "high.py").write_text("from cyc import low\n")
    config = tmp_path / "contracts.toml"
    config.write_text('[tool.importlinter]\nroot_package = "cyc"\n\n[[tool.importlinter.contracts]]\n'
                      'name = "acyclic"\ntype = "acyclic_siblings"\nancestors = ["cyc"]\n')
    done = _lint(tmp_path, config, pythonpath=tmp_path)
    assert done.returncode != 0 and "BROKEN" in done.stdout, done.stdout + done.stderr


def test_the_command_line_layer_holds_no_product_rules():
    """The CLI parses and prints: no module below it imports it, and it never touches argparse below it."""
    for path in (ROOT / "qedit").rglob("*.py"):
        if path.parent.name == "cli" or path.name == "__main__.py":
            continue
        text = path.read_text()
        assert "argparse" not in text, f"{path} knows argparse: flags belong to qedit/cli"
        assert "from qedit.cli" not in text and "import qedit.cli" not in text, path
