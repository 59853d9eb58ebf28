"""A refusal in config validation and a stage's `--help` are quick: the CLI loads the config defaults and
refuses the config (or lists its fields) without importing the model, optimiser, data-pipeline, checkpoint and
tokenizer libraries (transformers pulls in torch where it is installed: seconds per typo). Each case runs the
CLI's `main` in a fresh interpreter and reads `sys.modules` after it exits."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
# what a refusal or a stage's --help must not import (transformers and torch cost seconds; flax, optax, grain,
# orbax and safetensors together about 0.8 s). The config defaults live in modules that import none of them
# (models/config.py, train/config.py, align/config.py, eval/config.py, the other packages' config.py), and the
# packages models, train, data, parallel and report load their heavy modules on first use of a name
# (`__getattr__`). jax itself is still imported (context/__init__.py, the `run` group's owner).
HEAVY = ("transformers", "torch", "tokenizers", "flax", "optax", "grain", "orbax", "safetensors")
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


@pytest.mark.parametrize("stage", ["distill", "demo"])  # demo reads every group
def test_a_stage_help_imports_no_heavy_library(stage):
    code, err, modules = _run_cli(stage, "--help")
    assert code == 0 and err == "", err[-3000:]
    assert sorted(modules & set(HEAVY)) == []


DEFERRED_NAMES = """
import importlib
from proxykd_jax import parallel, train
# a submodule as an attribute before anything imported it (train/distill.py: train.optim.check_whole_updates)
assert callable(train.optim.check_whole_updates) and callable(parallel.hosts.sync)
for pkg in ("models", "train", "data", "parallel", "report"):
    module = importlib.import_module("proxykd_jax." + pkg)
    for name in module.__all__:
        value = getattr(module, name)
        home = importlib.import_module(value.__module__) if hasattr(value, "__module__") else module
        assert getattr(home, name, value) is value, (pkg, name)
from proxykd_jax import train
assert callable(train.optim.make_optimizer)  # a module as an attribute (benchmarks/distill_step.py)
from proxykd_jax.data import prepare
assert callable(prepare) and prepare.__module__ == "proxykd_jax.data.prepare"  # the function, not the module
print("ok")
"""


def test_the_deferred_package_names_all_load():
    # models, train, data, parallel and report import their heavy modules on the first use of a name; each name of
    # their __all__ is still the object its module defines (in a fresh interpreter: the report's runner imports
    # the report's metrics module while the package's names load)
    env = os.environ | {"PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", DEFERRED_NAMES], capture_output=True, text=True, env=env, timeout=120)
    assert proc.stdout.strip() == "ok", proc.stderr[-3000:]


GENERIC_TOKENIZER = """
import sys
from proxykd_jax.models.tokenizer import build_word_tokenizer, load_tokenizer
build_word_tokenizer(["a", "b"], sys.argv[1])
tokenizer = load_tokenizer(sys.argv[1])
assert tokenizer("a b")["input_ids"], tokenizer
print(" ".join(sorted(m for m in ("torch", "transformers.models.auto.tokenization_auto") if m in sys.modules)))
"""


def test_a_generic_tokenizer_loads_without_the_auto_classes_or_torch(tmp_path):
    # every stage loads the prepared tokenizer (a generic tokenizer.json): AutoTokenizer's module imports every
    # model config, and torch where it is installed, about 2 s a process; only a model-specific class needs it
    env = os.environ | {"PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    code = ["-c", GENERIC_TOKENIZER, str(tmp_path / "tok")]
    proc = subprocess.run([sys.executable, *code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "", proc.stdout
