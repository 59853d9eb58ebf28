"""A refusal in config validation is quick: the CLI loads the config and refuses it without importing the
tokenizer and checkpoint libraries (transformers pulls in torch where it is installed: seconds per typo).
Each case runs the CLI's `main` in a fresh interpreter and reads `sys.modules` after it exits."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
# what a refusal must not import (transformers and torch cost seconds). The modules that own config defaults
# still import jax, flax and optax (models/llama.py, train/optim.py), grain and orbax (train/distill.py,
# train/checkpoint.py) and safetensors (models/safetensors_io.py, through eval/benchmark.py).
HEAVY = ("transformers", "torch", "tokenizers")
WRAPPER = """
import json, sys
from proxykd_jax import cli
code = None
try:
    cli.main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "modules": sorted({m.split(".")[0] for m in sys.modules})}))
"""


def _run_cli(*argv: str) -> tuple[int, str, set[str]]:
    """(exit code, stderr, top-level packages imported) of `proxykd <argv>` in a fresh interpreter."""
    env = os.environ | {"PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", WRAPPER, *argv], capture_output=True, text=True, cwd=REPO, env=env, timeout=120
    )
    assert proc.stdout.strip(), proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result["code"], proc.stderr, set(result["modules"])


@pytest.mark.parametrize(
    "argv, line",
    [
        (
            ("distill", "--config=configs/demo.py", "--config.model.num_kv_heads=0"),
            "error: proxykd distill: config.model.num_kv_heads=0 must be positive.",
        ),
        (
            ("prepare", "--config=configs/demo.py", "--config.data.prepare_buffer_mb=nan"),
            "error: proxykd prepare: config.data.prepare_buffer_mb=nan must be a finite number above 0; set --config.data.prepare_buffer_mb to one.",
        ),
    ],
    ids=["distill-model", "prepare-data"],
)
def test_a_config_refusal_imports_no_tokenizer_or_checkpoint_library(argv, line):
    code, err, modules = _run_cli(*argv)
    assert code == 2 and err.splitlines() == [line], err[-3000:]
    assert sorted(modules & set(HEAVY)) == []


def test_the_usage_imports_no_jax():
    code, err, modules = _run_cli("--help")
    assert code == 0 and err == ""
    assert sorted(modules & {"jax", "ml_collections", *HEAVY}) == []
