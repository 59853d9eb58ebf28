"""Damages every file of a finished tiny run, one at a time, and runs each stage that reads it: a manual scan (about
15 minutes on 2 cores), not part of the suite; `tests/test_damaged_files.py` and `tests/test_bad_input.py` keep
what it found. Prints one JSON line per case (exit code, whether a traceback was printed, the last error line) and a
count of the outcomes; a traceback is a defect, a finished run means the stage did not read the damaged bytes
(or could not tell, as for a model folder's config.json, which carries no checksum).

    python tests/damage_scan.py [--only SUBSTRING] [--workers 3]
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import os
import pathlib
import pickle
import shutil
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parent.parent
# the artifact folders, and the stages that read each (with the folders to remove so that they run, not reuse)
CONSUMERS = {
    "prior": [("posterior", ["posterior"])],
    "posterior": [("distill", ["student"])],
    "prepared": [("prior", ["prior"]), ("distill", ["student"]), ("eval", ["eval"]), ("align", ["proxy"])],
    "proxy/final": [("posterior", ["posterior"]), ("eval", ["eval"])],
    "student/final": [("eval", ["eval"]), ("export", [])],
}


def damages(data: bytes) -> dict[str, bytes]:
    flipped = bytearray(data)
    if flipped:
        flipped[len(flipped) // 2] ^= 0x55
    return {"half": data[: len(data) // 2], "flip": bytes(flipped), "garbage": b"\x00garbage{" * 3, "empty": b""}


def build(base: pathlib.Path) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    import conftest  # noqa: F401  # 8 devices, the compilation cache
    from pipeline_fixtures import build_run
    from stage_helpers import run_stage

    cfg, _ = build_run(base / "run")
    with cfg.unlocked():
        cfg.train.checkpoint_every = 3
    for stage in ("prior", "align", "posterior", "distill", "eval"):
        run_stage(stage, cfg)
    (base / "cfg.pkl").write_bytes(pickle.dumps(cfg))


def run_case(base: pathlib.Path, rel: str, damage: str, stage: str, remove: list[str]) -> dict:
    case = base / "cases" / f"{rel.replace('/', '_')}.{damage}.{stage}"
    shutil.copytree(base / "run", case, symlinks=True, ignore=shutil.ignore_patterns("proxykd.lock"))
    for name in remove:
        shutil.rmtree(case / name, ignore_errors=True)
    (case / rel).write_bytes(damages((base / "run" / rel).read_bytes())[damage])
    argv = [sys.executable, "-m", "proxykd_jax", stage, f"--config=tests/pickled_config.py:{base / 'cfg.pkl'}"]
    argv += [f"--config.run.dir={case}"] + ([f"--config.export.out={case}/exported"] if stage == "export" else [])
    env = os.environ | {"PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    env |= {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    shutil.rmtree(case, ignore_errors=True)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    last = (errors or proc.stderr.strip().splitlines() or [""])[-1]
    return {"case": case.name, "rc": proc.returncode, "traceback": "Traceback" in proc.stderr, "line": last[:300]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="damage only files whose run-relative path holds this")
    parser.add_argument("--workers", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = pathlib.Path(tmp)
        build(base)
        cases = [
            (str(f.relative_to(base / "run")), damage, stage, remove)
            for folder, readers in CONSUMERS.items()
            for f in sorted((base / "run" / folder).rglob("*"))
            if f.is_file() and f.name != "artifact.json" and "metrics" not in f.name and args.only in str(f)
            for damage in damages(b"x")
            for stage, remove in readers
        ]
        outcomes = collections.Counter()
        with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
            for result in pool.map(lambda c: run_case(base, *c), cases):
                print(json.dumps(result), flush=True)
                outcomes["traceback" if result["traceback"] else f"exit {result['rc']}"] += 1
        print(json.dumps(dict(outcomes)))


if __name__ == "__main__":
    main()
