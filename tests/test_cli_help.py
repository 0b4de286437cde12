"""Every command-line entry point of README's table answers ``--help`` (in this process: its parser only)."""
import importlib
import importlib.util
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_commands():
    readme = open(os.path.join(ROOT, "README.md")).read()
    table = readme.split("## Command-line tools", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `(?:python -m ([\w.]+)|deepspeed \S+ \S+ (examples/\S+\.py))", table, re.M)


def _main(module: str, script: str):
    if script:
        spec = importlib.util.spec_from_file_location("train_example", os.path.join(ROOT, script))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod.main
    return importlib.import_module(module).main


def test_readme_lists_every_entry_point():
    listed = {m or s for m, s in _readme_commands()}
    found = set()
    for folder, _, files in os.walk(os.path.join(ROOT, "piper_ds")):
        for name in files:
            path = os.path.join(folder, name)
            if name.endswith(".py") and 'if __name__ == "__main__":' in open(path).read():
                found.add(os.path.relpath(path, ROOT)[:-3].replace(os.sep, "."))
    assert found | {"examples/train.py"} == listed


@pytest.mark.parametrize("module,script", _readme_commands())
def test_help(module, script, capsys):
    with pytest.raises(SystemExit) as exit_:
        _main(module, script)(["--help"])
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out
