"""The import contracts of ``.importlinter`` (import-linter's ``lint-imports``): they hold for this checkout,
and they break when a runtime module imports the planner."""
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINT = ("import sys; from importlinter.cli import lint_imports; "
        "sys.exit(lint_imports(config_filename='.importlinter', no_cache=True, no_logo=True))")


def lint(root: str) -> subprocess.CompletedProcess:
    """``lint-imports`` on the piper_ds package of ``root`` (put first on the path: not an installed copy)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", LINT], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120)


def test_the_contracts_hold():
    proc = lint(ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "5 kept, 0 broken" in proc.stdout


def test_a_runtime_module_importing_the_planner_breaks_them(tmp_path):
    shutil.copytree(os.path.join(ROOT, "piper_ds"), tmp_path / "piper_ds",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(ROOT, ".importlinter"), tmp_path)
    with open(tmp_path / "piper_ds" / "moe" / "layer.py", "a") as f:
        f.write("\nfrom piper_ds.planner import memory  # noqa: E402,F401\n")
    proc = lint(str(tmp_path))
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "The runtime never imports the planner or the measurement tools BROKEN" in proc.stdout
    assert "piper_ds.moe.layer -> piper_ds.planner.memory" in proc.stdout
