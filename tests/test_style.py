"""One formatting style across the repository: `ruff format` and `ruff check` (settings in pyproject.toml)."""

import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _ruff() -> list[str]:
    exe = pathlib.Path(sys.executable).with_name("ruff")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("ruff")
    if found is None:
        pytest.fail("ruff is not installed; `make test` installs it from requirements/test.lock.")
    return [found]


@pytest.mark.parametrize("args", [["format", "--check", "--diff"], ["check", "--no-fix"]], ids=["format", "check"])
def test_ruff(args):
    result = subprocess.run(_ruff() + args + ["."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, f"ruff {' '.join(args)} found problems:\n{result.stdout}{result.stderr}"
