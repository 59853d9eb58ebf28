"""A full disk and a device out of memory end a stage with one line, never a traceback: the run-directory
lock is released, nothing finished is lost, and the same command resumes once space is freed.

The failures are injected (a write that fails with ENOSPC part-way, a real XLA out-of-memory) so these run
anywhere; `test_a_real_full_tmpfs` fills a real filesystem where this process may mount one."""

from __future__ import annotations

import errno
import gc
import json
import logging
import os
import pathlib
import pickle
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from proxykd_jax import cli
from proxykd_jax import config as config_lib
from proxykd_jax.context.lock import RunLock
from tests.pipeline_fixtures import build_run

REPO = pathlib.Path(__file__).resolve().parent.parent
NO_SPACE = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _explain(stage: str, error: BaseException, run_dir: str = "/r", argv=(), devices: int = 1, lora: int = 0):
    """`exhaustion.explain` on a base config whose run directory is `run_dir`."""
    from proxykd_jax import exhaustion

    cfg = config_lib.base_config()
    cfg.run.dir, cfg.align.lora.rank = run_dir, lora
    return exhaustion.explain(stage, error, cfg=cfg, argv=list(argv), devices=devices)


@pytest.fixture(scope="module")
def prepared_run(tmp_path_factory):
    """A tiny run directory holding only prepared data (what `proxykd prior` reads), and its config."""
    cfg, _ = build_run(tmp_path_factory.mktemp("exhaustion") / "run")
    return cfg


def _copy(cfg, run_dir: pathlib.Path, tmp_path: pathlib.Path) -> list[str]:
    """A copy of the prepared run at `run_dir`; the CLI arguments of a stage on it (a pickled config)."""
    shutil.copytree(pathlib.Path(cfg.run.dir), run_dir, symlinks=True)
    cfg = cfg.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.run.dir = str(run_dir)
    pkl = tmp_path / f"{run_dir.name}.pkl"
    pkl.write_bytes(pickle.dumps(cfg))
    return [f"--config={REPO}/tests/pickled_config.py:{pkl}"]


def _main(args: list[str], monkeypatch) -> int:
    """`proxykd ARGS` in this process: its exit status (a traceback raises out of here)."""
    monkeypatch.setattr(sys, "argv", ["proxykd", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    return exit_info.value.code


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err and 'File "' not in err, err
    return lines[0]


def _tables(run_dir: pathlib.Path) -> dict:
    with np.load(run_dir / "prior" / "tables.npz") as z:
        return {k: z[k] for k in z.files}


def test_disk_full_mid_write_is_one_line_and_the_rerun_resumes(prepared_run, tmp_path, monkeypatch, capsys):
    """The prior's tables half written when the disk fills: one line naming the run directory (the
    OSError of a write names no file), exit 2, the lock released; the same command then finishes with
    the tables of a run that never failed."""
    args = _copy(prepared_run, tmp_path / "full", tmp_path)
    savez = np.savez

    def fills_up(file, *a, **kw):
        file.write(b"PK\x03\x04" + bytes(64))  # part of the archive, then the disk is full
        raise NO_SPACE

    monkeypatch.setattr(np, "savez", fills_up)
    assert _main(["prior", *args], monkeypatch) == 2
    line = _error_line(capsys.readouterr().err)
    assert line.startswith("error: proxykd prior: no space left on device writing ") and str(tmp_path / "full") in line
    assert line.endswith("free space on that filesystem and run the same command again to resume."), line
    assert not (tmp_path / "full" / "proxykd.lock").exists()
    assert not json.loads((tmp_path / "full" / "prior" / "artifact.json").read_text())["finished"]

    monkeypatch.setattr(np, "savez", savez)
    assert _main(["prior", *args], monkeypatch) == 0
    assert _main(["prior", *_copy(prepared_run, tmp_path / "whole", tmp_path)], monkeypatch) == 0
    got, want = _tables(tmp_path / "full"), _tables(tmp_path / "whole")
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)


def test_a_full_disk_while_taking_the_lock_leaves_no_lock(tmp_path, monkeypatch):
    """The lock file created but its owner not written (the disk filled): the file goes, or every later
    command would refuse the run directory until someone deleted it."""
    lock_path = tmp_path / "run" / "proxykd.lock"

    def fills_up(obj, f, **kw):
        f.write('{"pid": ')
        raise NO_SPACE

    monkeypatch.setattr("json.dump", fills_up)
    with pytest.raises(OSError):
        RunLock(lock_path, "prior").acquire()
    monkeypatch.undo()
    assert not lock_path.exists()
    lock = RunLock(lock_path, "prior")
    lock.acquire()
    lock.release()


def test_a_lock_process_0_cannot_write_stops_every_process(tmp_path, monkeypatch):
    """Process 0 of a multi-process run that cannot write the lock (a full disk) tells the others, which
    wait on its broadcast, before it raises: they stop too instead of waiting forever."""
    from proxykd_jax import context
    from proxykd_jax.parallel import hosts

    told = []
    monkeypatch.setattr(RunLock, "acquire", lambda self: (_ for _ in ()).throw(NO_SPACE))
    monkeypatch.setattr(hosts, "broadcast", lambda value: told.append(value) or value)
    with pytest.raises(OSError):
        context._take_lock(context.RunPaths(tmp_path / "run"), "prior")
    assert told == [1]


def _oom():
    """A real XLA out-of-memory (1 TiB), raised in a few milliseconds."""
    return jax.jit(lambda x: jnp.ones((x.shape[0], 1 << 36)) * x[:, None])(jnp.ones(4)).block_until_ready()


def test_device_out_of_memory_is_one_line(prepared_run, tmp_path, monkeypatch, capsys):
    """XLA's RESOURCE_EXHAUSTED in a stage: one line with the stage, XLA's first line and what to do
    (`proxykd plan`, rematerialisation, a smaller batch), exit 2, the lock released."""
    args = _copy(prepared_run, tmp_path / "run", tmp_path)
    monkeypatch.setattr("proxykd_jax.bayes.tables.write_prior", lambda *a, **kw: _oom())
    assert _main(["prior", *args], monkeypatch) == 2
    line = _error_line(capsys.readouterr().err)
    assert line.startswith(
        "error: proxykd prior: the device ran out of memory (RESOURCE_EXHAUSTED: Out of memory allocating "
    ), line
    for want in ("proxykd plan " + args[0], "remat=full", "checkpoints written so far are kept", "resume"):
        assert want in line, f"{want!r} not in {line!r}"
    assert not (tmp_path / "run" / "proxykd.lock").exists()


def test_out_of_memory_advice_names_the_stage_fields():
    """The distill stage's line names its step for `proxykd plan`, the user's own config arguments and
    the fields it runs on (train.batch_size, train.seq_len, model.remat); align the proxy's."""
    try:
        _oom()
    except jax.errors.JaxRuntimeError as e:
        error = e
    argv = ["--config=configs/demo.py", "--config.train.batch_size=64"]
    line = _explain("distill", error, argv=argv, devices=8)
    assert "proxykd plan --config=configs/demo.py --config.train.batch_size=64 --devices=8 --steps=distill" in line
    assert all(f in line for f in ("train.batch_size", "train.seq_len", "--config.model.remat=full")), line
    line = _explain("align", error, argv=argv)
    assert "--steps=sft,dpo`" in line and "--steps=sft_lora,dpo_lora`" in _explain("align", error, lora=8)
    assert "--devices=1 " in line and "align.batch_size" in line and "--config.proxy.remat=full" in line, line


@pytest.mark.parametrize(
    "error, want",
    [
        (
            OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/run/prior/x.npz"),
            "no space left on device writing /data/run/prior/x.npz",
        ),
        (OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)), "disk quota exceeded writing under /r"),
        (OSError(errno.EROFS, os.strerror(errno.EROFS), "/r/lock"), "read-only file system writing /r/lock"),
        (OSError(errno.EFBIG, os.strerror(errno.EFBIG), "/r/lock"), "file too large (the process's file-size limit"),
        (
            PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/r/prior"),
            "permission denied on /r/prior; give this user access",
        ),
        (
            NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), "/r/notes.txt/student"),
            "not a directory on /r/notes.txt/student; a part of that path is a file",
        ),
        (  # array_record's writer
            RuntimeError("write() failed: No space left on device; writing /r/prepared/a.arrayrecord; at byte 0"),
            "no space left on device writing /r/prepared/a.arrayrecord;",
        ),
        (  # tensorstore under orbax, raised again by the checkpoint manager's thread
            ValueError(
                'RESOURCE_EXHAUSTED: Error writing local file "/r/student/3.orbax-checkpoint-tmp/_sharding": Failed '
                'writing: "/r/student/3.orbax-checkpoint-tmp/_sharding.__lock": Failed to write 12 bytes to file 5: '
                "No space left on device [os_error_code='28']"
            ),
            "no space left on device writing /r/student/3.orbax-checkpoint-tmp/_sharding;",
        ),
    ],
    ids=["enospc-path", "edquot", "erofs", "efbig", "eacces", "enotdir", "array-record", "tensorstore"],
)
def test_disk_full_errors_are_recognised_in_the_chain(error, want):
    """Each form a full disk takes, also as the cause of another exception, names the file it names."""
    try:
        try:
            raise error
        except Exception as inner:
            raise RuntimeError("a background save failed") from inner
    except RuntimeError as outer:
        line = _explain("distill", outer)
    assert line is not None and want in line, line


def test_host_out_of_memory_is_one_line_naming_the_stage_fields():
    """numpy's MemoryError for a batch far too large (eval.batch_size=10**12 reached grain's batching as a
    traceback): one line with numpy's size and the stage's fields to lower."""
    try:
        np.empty((10**12, 1 << 16), np.float32)  # 256 PB
    except MemoryError as e:
        error = e
    try:
        raise RuntimeError("a worker failed") from error
    except RuntimeError as outer:
        line = _explain("eval", outer)
    assert line is not None and line.startswith("the host ran out of memory (MemoryError: Unable to allocate "), line
    assert "lower eval.batch_size or data.seq_len, or run on a machine with more memory" in line, line
    assert _explain("distill", MemoryError()).startswith("the host ran out of memory (MemoryError); lower train.")


def test_a_sentence_of_the_stage_itself_is_kept():
    """A stage's own sentence about a full disk (collect counts what it stored) is not replaced."""
    from proxykd_jax.errors import ProxyKDError

    try:
        try:
            raise NO_SPACE
        except OSError as e:
            raise ProxyKDError(
                f"collect stopped: cannot write /r/corpus/teacher.jsonl ({e.strerror}); 3 done"
            ) from None
    except ProxyKDError as e:
        assert _explain("collect", e) is None


def test_other_failures_keep_their_traceback(prepared_run, tmp_path, monkeypatch):
    """An OSError that is no full disk, a RuntimeError or another XLA error is a bug: its traceback stays."""
    args = _copy(prepared_run, tmp_path / "run", tmp_path)
    for error in (
        OSError(errno.EBADF, os.strerror(errno.EBADF)),
        RuntimeError("write() failed: something else"),
        jax.errors.JaxRuntimeError("INVALID_ARGUMENT: bad shapes"),
    ):

        def fails(*a, error=error, **kw):
            raise error

        monkeypatch.setattr("proxykd_jax.bayes.tables.write_prior", fails)
        monkeypatch.setattr(sys, "argv", ["proxykd", "prior", *args])
        with pytest.raises(type(error)) as raised:
            cli.main(["prior", *args])
        assert raised.value is error
        assert _explain("prior", error) is None


def test_a_run_directory_this_user_cannot_write(prepared_run, tmp_path):
    """`proxykd prior` where the run directory belongs to another user and this one may not write there: one
    line naming the file, exit 2 (it was a PermissionError traceback). Root without the capability to pass
    file permissions (capsh drops it) stands for that user; skipped where that cannot be arranged."""
    if os.geteuid() != 0 or shutil.which("capsh") is None:
        pytest.skip("needs root and capsh to drop CAP_DAC_OVERRIDE")
    run_dir = tmp_path / "theirs"
    args = _copy(prepared_run, run_dir, tmp_path)
    os.chown(run_dir, 65534, 65534)  # nobody's, mode 755: only nobody writes there
    os.chmod(run_dir, 0o755)
    command = " ".join([sys.executable, "-m", "proxykd_jax", "prior", *args])
    done = subprocess.run(
        ["capsh", "--drop=cap_dac_override,cap_dac_read_search", "--", "-c", command],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=os.environ | {"JAX_PLATFORMS": "cpu"},
    )
    if "Operation not permitted" in done.stderr and "capsh" in done.stderr:
        pytest.skip(f"capsh cannot drop capabilities here: {done.stderr.strip()}")
    assert done.returncode == 2, done.stderr
    line = _error_line(done.stderr)
    assert line.startswith(f"error: proxykd prior: permission denied on {run_dir}/"), line
    assert "--config.run.dir" in line and "run the same command again" in line, line
    assert not (run_dir / "prior").exists()


def _mount(where: pathlib.Path, size: str, *more: str) -> bool:
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", *more, "tmpfs", str(where)], capture_output=True
        ).returncode
        == 0
    )


def test_a_real_full_tmpfs(prepared_run, tmp_path, monkeypatch, capsys):
    """`proxykd prior` on a tmpfs that fills while it writes the tables (skipped where mount is not
    permitted): one line, no lock left; after the filesystem grows, the same command finishes."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    if shutil.which("mount") is None or not _mount(mount_point, "16m"):
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        args = _copy(prepared_run, mount_point / "run", tmp_path)
        st = os.statvfs(mount_point)
        used = (st.f_blocks - st.f_bfree) * st.f_frsize
        subprocess.run(["mount", "-o", f"remount,size={used + 16384}", str(mount_point)], check=True)
        assert _main(["prior", *args], monkeypatch) == 2
        line = _error_line(capsys.readouterr().err)
        assert line.startswith("error: proxykd prior: no space left on device writing "), line
        assert str(mount_point / "run") in line, line
        assert not (mount_point / "run" / "proxykd.lock").exists()
        subprocess.run(["mount", "-o", "remount,size=16m", str(mount_point)], check=True)
        assert _main(["prior", *args], monkeypatch) == 0
        assert json.loads((mount_point / "run" / "prior" / "artifact.json").read_text())["finished"]
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def test_background_reports_of_a_full_disk_are_dropped(prepared_run, tmp_path, monkeypatch, caplog, capsys):
    """A checkpoint thread's report of the failure (logged with its traceback through absl, or by asyncio
    for a task nobody awaited) is dropped: the stage raises the same failure, and its one line says it."""
    args = _copy(prepared_run, tmp_path / "run", tmp_path)

    def fails_in_a_thread(*a, **kw):
        logging.getLogger("absl").error("_SignalingThread.run() raised an exception", exc_info=NO_SPACE)
        logging.getLogger("asyncio").error("Task exception was never retrieved", exc_info=NO_SPACE)
        logging.getLogger("absl").warning("an unrelated warning")
        raise ValueError("a background save failed") from NO_SPACE

    monkeypatch.setattr("proxykd_jax.bayes.tables.write_prior", fails_in_a_thread)
    with caplog.at_level(logging.INFO):
        assert _main(["prior", *args], monkeypatch) == 2
    _error_line(capsys.readouterr().err)
    assert [r.getMessage() for r in caplog.records if r.name in ("absl", "asyncio")] == ["an unrelated warning"]


def test_a_checkpoint_save_on_a_full_tmpfs(tmp_path, caplog):
    """orbax's asynchronous save filling a real tmpfs (skipped where mount is not permitted): the failure
    reaches the caller, names the file, reports nothing with a traceback, and finalises no partial step;
    the checkpoint before it restores."""
    from proxykd_jax import exhaustion
    from proxykd_jax.train.checkpoint import Checkpointer

    mount_point = tmp_path / "small"
    mount_point.mkdir()
    if shutil.which("mount") is None or not _mount(mount_point, "256k"):
        pytest.skip("mounting a tmpfs is not permitted here")
    exhaustion.quiet_background_reports()
    reported, unraisable = [], sys.unraisablehook  # what reaches the hook whose default prints a traceback
    sys.unraisablehook = reported.append
    try:
        small = {"w": jnp.arange(8.0)}
        ckpt = Checkpointer(mount_point / "ckpt", keep=3)
        ckpt.save(1, small)
        ckpt.wait()
        big = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(512, 1024)).astype(np.float32))}
        with caplog.at_level(logging.INFO), pytest.raises(Exception) as raised:
            ckpt.save(2, big)
            ckpt.wait()
        line = exhaustion.explain("distill", raised.value, cfg=None, argv=[], devices=1)
        assert line is not None and line.startswith(f"no space left on device writing {mount_point}/ckpt/2"), line
        gc.collect()
        assert not [r for r in caplog.records if r.exc_info], [r.getMessage()[:200] for r in caplog.records]
        assert not reported, [str(u.exc_value) for u in reported]
        again = Checkpointer(mount_point / "ckpt", keep=3)
        assert again.all_steps() == [1]
        target = {"w": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=small["w"].sharding)}
        np.testing.assert_array_equal(np.asarray(again.restore(target, step=1)["w"]), np.arange(8.0))
        again.close()
    finally:
        sys.unraisablehook = unraisable
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


class _Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("str() of this error fails")


def test_an_error_whose_str_fails_is_no_exhaustion_and_its_report_is_kept(caplog):
    """`explain` and the log filter read each error's text: one whose str() raises is not a full disk or an
    out-of-memory (its traceback stays), and a thread's report of it is logged, not raised from the log call."""
    from proxykd_jax import exhaustion

    try:
        raise ValueError("a background save failed") from _Unprintable()
    except ValueError as e:
        assert _explain("distill", e) is None
    exhaustion.quiet_background_reports()
    with caplog.at_level(logging.INFO):
        logging.getLogger("absl").error("a thread failed", exc_info=_Unprintable())
    assert [r.getMessage() for r in caplog.records if r.name == "absl"] == ["a thread failed"]
