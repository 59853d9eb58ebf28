"""Start-up of the command line: how long `proxykd` takes to refuse a bad field, print a stage's help, show a
run's status, or start a stage (prepare: load a tokenizer, then refuse the corpus's second line), each in a fresh
interpreter, and which heavy libraries each imported.

    python benchmarks/cli_startup.py [--repeats 3] [--tree PATH ...]

`--tree` measures other checkouts of the project beside this one (e.g. an older commit unpacked with
`git archive COMMIT | tar -x -C /tmp/old`); the trees are run interleaved, so a busy machine slows each
alike. One table: per tree and command, the median and range of wall seconds, and the heavy libraries
imported (from `sys.modules` after the command exits), and the interpreter with `import jax` alone as the
floor in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import print_table  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("jax", "flax", "optax", "orbax", "grain", "safetensors", "transformers", "tokenizers", "torch", "openai")
# runs the CLI's main in this interpreter and prints the top-level packages it imported
WRAPPER = """
import json, sys
from proxykd_jax import cli
try:
    cli.main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})), file=sys.__stdout__)
"""


def commands(tmp: str) -> dict[str, list[str]]:
    from proxykd_jax.models.tokenizer import build_word_tokenizer

    build_word_tokenizer(["a", "b"], os.path.join(tmp, "tokenizer"))  # generic, as `prepare` saves one
    with open(os.path.join(tmp, "corpus.jsonl"), "w") as f:
        f.write('{"prompt": "a", "response": "b"}\n{not json\n')
    missing_run = os.path.join(tmp, "no_run")
    return {
        "refusal": ["distill", "--config=configs/demo.py", "--config.model.num_kv_heads=0"],
        "distill --help": ["distill", "--help"],
        "status": ["status", "--config=configs/demo.py", f"--config.run.dir={missing_run}"],
        "prepare, line 2 refused": [
            "prepare",
            "--config=configs/demo.py",
            f"--config.data.tokenizer={os.path.join(tmp, 'tokenizer')}",
            f"--config.data.corpus={os.path.join(tmp, 'corpus.jsonl')}",
            f"--config.run.dir={missing_run}",
        ],
    }


def run_once(tree: str, argv: list[str] | None) -> tuple[float, list[str]]:
    """(wall seconds, heavy libraries imported) of one command in a fresh interpreter (None: `import jax`)."""
    env = dict(os.environ, PYTHONPATH=tree, JAX_PLATFORMS="cpu")
    code = ["-c", "import jax"] if argv is None else ["-c", WRAPPER, *argv]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *code], cwd=tree, env=env, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - start
    if argv is None:
        return seconds, ["jax"]
    modules = json.loads(proc.stdout.strip().splitlines()[-1])
    return seconds, [m for m in HEAVY if m in modules]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tree", nargs="*", default=[], help="other checkouts to measure beside this one")
    args = parser.parse_args()
    trees = [REPO, *args.tree]
    with tempfile.TemporaryDirectory() as tmp:
        runs = {"import jax": None, **commands(tmp)}
        times: dict[tuple[str, str], list[float]] = {}
        heavy: dict[tuple[str, str], list[str]] = {}
        for _ in range(args.repeats):
            for name, argv in runs.items():
                for tree in trees if argv is not None else trees[:1]:
                    seconds, imported = run_once(tree, argv)
                    times.setdefault((tree, name), []).append(seconds)
                    heavy[(tree, name)] = imported
    rows = [
        [
            tree if tree != REPO else "this checkout",
            name,
            statistics.median(t),
            f"{min(t):.2f}-{max(t):.2f}",
            " ".join(heavy[(tree, name)]) or "-",
        ]
        for (tree, name), t in times.items()
    ]
    print_table(rows, ["tree", "command", "median s", "range s", "heavy libraries imported"])


if __name__ == "__main__":
    main()
