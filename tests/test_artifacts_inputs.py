"""What an artifact is made from: an upstream artifact that is not finished is refused (not read in
part and then reused as if whole), an input file or folder is identified by its content and a model
folder by its small files and its weights' stamps, so one changed in place counts as changed; a file
artifact's refusals name its real record."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest
from stage_helpers import run_stage

from proxykd_jax import config as config_lib
from proxykd_jax import context
from proxykd_jax.context import artifacts, identity, specs
from proxykd_jax.context.artifacts import open_artifact
from proxykd_jax.context.records import read_record, record_path
from proxykd_jax.errors import ProxyKDError

REPO = pathlib.Path(__file__).resolve().parent.parent


def _cfg(tmp_path, **data):
    cfg = config_lib.base_config()
    cfg.run.dir = str(tmp_path / "run")
    cfg.data.update(data)
    return cfg


def _open(name, cfg, overwrite=False):
    return open_artifact(name, cfg, context.RunPaths.from_config(cfg), overwrite=overwrite)


def _unfinished_corpus(cfg) -> pathlib.Path:
    art = _open("collect", cfg)  # as `collect` left it when it exited 2 after some of the samples
    art.begin()
    art.work.write_text(json.dumps({"id": "q0", "prompt": "hi", "response": "a", "key": "k0"}) + "\n")
    return art.path


def test_an_unfinished_upstream_artifact_is_refused_naming_it_and_its_command(tmp_path):
    (tmp_path / "tok").mkdir()
    cfg = _cfg(tmp_path, tokenizer=str(tmp_path / "tok"))
    corpus = _unfinished_corpus(cfg)
    refusal = r"corpus/teacher.jsonl is not finished .*re-run that `proxykd collect` command to finish it"
    with pytest.raises(ProxyKDError, match=refusal):
        context.preflight(cfg, "prepare")  # the CLI: before the run directory is locked
    with pytest.raises(ProxyKDError, match=refusal):
        run_stage("prepare", cfg)
    assert not (tmp_path / "run" / "prepared").exists()
    finished = _open("collect", cfg)
    assert finished.status == "resume"
    finished.finish({"done": 1})
    assert _open("prepare", cfg).status == "new" and corpus.exists()  # finished: prepare may read it now


def test_an_unfinished_corpus_named_by_path_is_refused_too(tmp_path):
    """`data.corpus` naming a corpus `collect` is still writing (the run's own, or one written with
    collect.out) is refused as the run's corpus is; a corpus file of the user's (no record) is read."""
    (tmp_path / "tok").mkdir()
    cfg = _cfg(tmp_path, tokenizer=str(tmp_path / "tok"))
    corpus = _unfinished_corpus(cfg)
    own = _cfg(tmp_path, tokenizer=str(tmp_path / "tok"), corpus=f"{tmp_path / 'users.jsonl'},{corpus}")
    (tmp_path / "users.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    with pytest.raises(ProxyKDError, match=r"corpus/teacher.jsonl is not finished .*`proxykd collect`"):
        context.preflight(own, "prepare")
    _open("collect", cfg).finish({"done": 1})
    assert _open("prepare", own).status == "new"
    users = _cfg(tmp_path / "other", tokenizer=str(tmp_path / "tok"), corpus=str(tmp_path / "users.jsonl"))
    assert _open("prepare", users).status == "new"


def test_an_unfinished_upstream_makes_a_finished_dependant_stale_rather_than_reused(tmp_path):
    cfg = _cfg(tmp_path)
    prepared = _open("prepare", cfg)
    prepared.begin()  # prepare killed part-way: prior must not be made from part of it
    with pytest.raises(ProxyKDError, match=r"prepared is not finished .*`proxykd prepare`"):
        _open("prior", cfg)
    prepared.finish()
    assert _open("prior", cfg).status == "new"


def _prepared(cfg):
    art = _open("prepare", cfg)
    art.begin()
    art.finish({"samples": 1})
    return art


def test_a_corpus_or_tokenizer_changed_in_place_counts_as_changed(tmp_path):
    corpus, tok = tmp_path / "corpus.jsonl", tmp_path / "tok"
    corpus.write_text('{"prompt": "a", "response": "b"}\n')
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"v": 1}')
    (tok / "model.safetensors").write_bytes(b"weights")
    cfg = _cfg(tmp_path, corpus=str(corpus), tokenizer=str(tok))
    _prepared(cfg)
    assert _open("prepare", cfg).done
    (tok / "model.safetensors").write_bytes(b"other weights")  # not the tokenizer: still the same input
    assert _open("prepare", cfg).done
    with corpus.open("a") as f:
        f.write('{"prompt": "c", "response": "d"}\n')
    with pytest.raises(ProxyKDError, match=r"the content of its input data.corpus \(.*corpus.jsonl\) changed"):
        _open("prepare", cfg)
    redo = _open("prepare", cfg, overwrite=True)
    redo.begin()
    redo.finish()
    assert _open("prepare", cfg).done
    (tok / "tokenizer.json").write_text('{"v": 2}')
    with pytest.raises(ProxyKDError, match=r"the content of its input data.tokenizer \(.*tok\) changed"):
        _open("prepare", cfg)


def test_an_unchanged_input_file_is_not_read_again(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"prompt": "a", "response": "b"}\n')
    old = 1_000_000_000_000_000_000  # an mtime well in the past (2001): the stamp is trusted
    os.utime(corpus, ns=(old, old))
    cfg = _cfg(tmp_path, corpus=str(corpus))
    _prepared(cfg)
    stamp = read_record(tmp_path / "run" / "prepared")["stamps"][str(corpus.absolute())]
    assert stamp[:2] == [corpus.stat().st_size, old]
    read = []
    monkeypatch.setattr(identity, "open", lambda *a, **k: read.append(a) or open(*a, **k), raising=False)
    assert _open("prepare", cfg).done and read == []  # the recorded size and mtime_ns stand for the digest
    with corpus.open("a") as f:
        f.write("\n")
    with pytest.raises(ProxyKDError, match=r"data.corpus .* changed"):
        _open("prepare", cfg)
    assert read == [(corpus, "rb")]


def test_a_record_from_before_input_files_were_recorded_is_still_reused(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"prompt": "a", "response": "b"}\n')
    cfg = _cfg(tmp_path, corpus=str(corpus))
    art = _prepared(cfg)
    rec = read_record(art.path)
    for key in ("files", "stamps"):
        del rec[key]
    rec["hash"] = artifacts._hash(rec["fields"], rec["inputs"])
    record_path(art.path, False).write_text(json.dumps(rec))
    assert _open("prepare", cfg).done  # and the dependants' inputs (its hash) are unchanged


# ------------------------------------------------------------------------------------ model folders

_PAST = 1_000_000_000_000_000_000  # an mtime well in the past (2001): no file is within its mtime tick
# (stage, config field) of every model folder a stage reads
MODEL_FOLDERS = [
    ("align", "proxy.init_from"),
    ("posterior", "posterior.proxy"),
    ("distill", "model.init_from"),
    ("distill", "distill.white_box"),
    ("eval", "proxy.init_from"),
    ("eval", "eval.known_teacher"),
]


def _model_folder(folder: pathlib.Path) -> pathlib.Path:
    """A tiny Hugging Face folder: config, tokenizer, weights, all with an mtime in the past."""
    (folder / "nested").mkdir(parents=True)
    (folder / "config.json").write_text('{"d_model": 8}')
    (folder / "nested" / "tokenizer.json").write_text('{"v": 1}')
    (folder / "model.safetensors").write_bytes(b"weights")
    for f in (folder / "config.json", folder / "nested" / "tokenizer.json", folder / "model.safetensors"):
        os.utime(f, ns=(_PAST, _PAST))
    return folder


def _with(cfg, key: str, value):
    group, field = key.split(".")
    cfg[group][field] = value
    return cfg


def _finished(name, cfg):
    art = _open(name, cfg)
    art.begin()
    art.finish({"done": 1})
    return art


@pytest.mark.parametrize("stage,key", MODEL_FOLDERS)
def test_a_model_folder_whose_weights_are_replaced_in_place_counts_as_changed(stage, key, tmp_path):
    folder = _model_folder(tmp_path / "model")
    cfg = _with(_cfg(tmp_path), key, str(folder))
    art = _finished(stage, cfg)
    assert _open(stage, cfg).done  # nothing touched: reused
    (folder / "model.safetensors").write_bytes(b"WEIGHTS")  # other weights of the same size, saved now
    refusal = (
        rf"^{re.escape(str(art.path))} \(finished\) was made from other settings or inputs: the content of its input "
        rf"{re.escape(key)} \({re.escape(str(folder))}\) changed\. Set --config.run.overwrite=True to replace it"
    )
    with pytest.raises(ProxyKDError, match=refusal):
        _open(stage, cfg)
    redo = _open(stage, cfg, overwrite=True)
    assert redo.status == "replace"
    redo.begin()
    redo.finish()
    assert _open(stage, cfg).done  # rebuilt from the new weights: reused again


def test_a_model_folder_untouched_is_reused_and_its_weights_never_read(tmp_path, monkeypatch):
    folder = _model_folder(tmp_path / "model")
    with open(folder / "pytorch_model-00001-of-00002", "wb") as f:  # weights by size, whatever the name
        f.truncate(identity._BIG)
    os.utime(folder / "pytorch_model-00001-of-00002", ns=(_PAST, _PAST))
    (folder / ".cache").mkdir()  # hidden: a download tool's own files, not the model
    (folder / ".cache" / "state").write_text("1")
    cfg = _with(_cfg(tmp_path), "proxy.init_from", str(folder))
    read = []
    monkeypatch.setattr(identity, "open", lambda *a, **k: read.append(a[0].name) or open(*a, **k), raising=False)
    art = _open("align", cfg)
    assert sorted(read) == ["config.json", "tokenizer.json"]  # the small files only
    art.begin()
    art.finish()
    read.clear()
    (folder / ".cache" / "state").write_text("2")
    os.utime(folder, ns=(_PAST + 5, _PAST + 5))  # the folder's own mtime is not part of it
    assert _open("align", cfg).done and read == []  # the record's stamps stand for the small files' digests
    big = folder / "pytorch_model-00001-of-00002"
    with open(big, "r+b") as f:
        f.truncate(identity._BIG + 1)
    with pytest.raises(ProxyKDError, match=r"the content of its input proxy.init_from \(.*model\) changed"):
        _open("align", cfg)
    assert "pytorch_model-00001-of-00002" not in read


def test_a_model_folder_copied_counts_as_the_same_only_with_its_stamps(tmp_path):
    """A copy with the same bytes: kept stamps (`cp -p`, copytree) is the same folder; new mtimes (`cp`) is a
    change (its weights are not read to tell); a copy elsewhere is other settings (the path is a field)."""
    folder = _model_folder(tmp_path / "model")
    cfg = _with(_cfg(tmp_path), "proxy.init_from", str(folder))
    _finished("align", cfg)
    shutil.copytree(folder, tmp_path / "copy")  # copy2: bytes and mtime_ns kept
    shutil.rmtree(folder)
    shutil.copytree(tmp_path / "copy", folder)
    assert _open("align", cfg).done
    shutil.rmtree(folder)
    shutil.copytree(tmp_path / "copy", folder, copy_function=shutil.copyfile)  # the same bytes, mtimes now
    with pytest.raises(ProxyKDError, match=r"the content of its input proxy.init_from \(.*model\) changed"):
        _open("align", cfg)
    moved = _with(_cfg(tmp_path), "proxy.init_from", str(tmp_path / "copy"))
    with pytest.raises(ProxyKDError) as err:
        _open("align", moved)
    assert f'proxy.init_from "{folder}" -> "{tmp_path / "copy"}"' in str(err.value)
    assert f"its input proxy.init_from ({tmp_path / 'copy'}) is new" in str(err.value)


def test_every_process_decides_with_process_0s_model_folder_identity(tmp_path):
    """A model folder copied to each host's own disk has other mtimes there: a process other than 0
    takes process 0's identities (`share`), so it reuses what process 0 reuses instead of refusing."""
    folder = _model_folder(tmp_path / "model")
    cfg = _with(_cfg(tmp_path), "proxy.init_from", str(folder))
    paths = context.RunPaths.from_config(cfg)
    writer = _finished("align", cfg)
    sent = []  # what process 0 shares: its fields, input files' and model folders' identities
    assert open_artifact("align", cfg, paths, overwrite=False, share=lambda text: sent.append(text) or text).done
    seen_by_0 = sent[-1]
    os.utime(folder / "model.safetensors", ns=(_PAST + 10**9, _PAST + 10**9))  # host 1's copy of the same folder
    with pytest.raises(ProxyKDError, match="proxy.init_from .* changed"):
        open_artifact("align", cfg, paths, overwrite=False, writer=False)  # deciding alone, it would stop
    other = open_artifact("align", cfg, paths, overwrite=False, writer=False, share=lambda text: seen_by_0)
    assert other.done and other.hash == writer.hash


def test_broadcast_text_and_open_artifact_on_two_processes(tmp_path):
    """Two jax.distributed processes: process 1 sees another identity of the model folder (its own
    copy's mtimes, patched in) and still reaches process 0's decision and hash."""
    folder = _model_folder(tmp_path / "model")
    cfg = _with(_cfg(tmp_path), "proxy.init_from", str(folder))
    _finished("align", cfg)
    (tmp_path / "cfg.json").write_text(cfg.to_json())
    script = tmp_path / "proc.py"
    script.write_text(
        textwrap.dedent(
            """
            import json, pathlib, sys
            import jax
            import ml_collections
            jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
            from proxykd_jax import context
            from proxykd_jax.context import artifacts, identity
            from proxykd_jax.parallel import hosts
            me = jax.process_index()
            assert hosts.broadcast_text("from " + "x" * (3 + 40 * me) + " é") == "from xxx é"
            if me == 1:  # this host's copy of the folder: other weights' stamps
                identity.model_id = lambda path, known=None, stamps=None: "host-1-copy"
            cfg = ml_collections.ConfigDict(json.loads(pathlib.Path(sys.argv[3]).read_text()))
            art = artifacts.open_artifact(
                "align", cfg, context.RunPaths.from_config(cfg), overwrite=False, sync=hosts.sync, writer=me == 0,
                share=hosts.broadcast_text,
            )
            print(json.dumps({"status": art.status, "hash": art.hash}))
            jax.distributed.shutdown()
            """
        )
    )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), XLA_FLAGS="")
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), f"127.0.0.1:{port}", str(i), str(tmp_path / "cfg.json")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-3000:] for _, err in outs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert results[0] == results[1] and results[0]["status"] == "done"


def test_a_record_from_before_model_folders_were_recorded_is_still_reused(tmp_path):
    folder = _model_folder(tmp_path / "model")
    cfg = _with(_cfg(tmp_path), "proxy.init_from", str(folder))
    art = _finished("align", cfg)
    rec = read_record(art.path)
    del rec["models"]  # as the version that identified model folders by their path wrote it
    rec["hash"] = artifacts._hash(rec["fields"], rec["inputs"], rec["files"])
    record_path(art.path, False).write_text(json.dumps(rec))
    assert _open("align", cfg).done  # not taken for changed: its dependants keep its hash
    with pytest.raises(ProxyKDError) as err:
        _open("align", _with(cfg, "align.beta", 0.5))
    assert "align.beta" in str(err.value) and "proxy.init_from" not in str(err.value)  # no folder to compare


def test_a_file_not_made_by_collect_names_its_record(tmp_path):
    cfg = config_lib.base_config()
    cfg.run.dir = str(tmp_path / "run")
    cfg.collect.out = str(tmp_path / "mine.jsonl")
    (tmp_path / "mine.jsonl").write_text("my own corpus\n")
    with pytest.raises(ProxyKDError, match=r"it has no .*mine\.jsonl\.artifact\.json\)"):
        _open("collect", cfg)


def test_a_stage_refused_for_an_unfinished_input_moves_none_of_its_other_inputs(tmp_path):
    """posterior refused for an unfinished prior/ leaves the proxy/ that a killed `align` was moving into
    place (.proxy.new finished, the old proxy/ set aside) as it found it: the refusal touches nothing."""
    cfg = _cfg(tmp_path)
    cfg.posterior.proxy = ""  # the run's own proxy/ is an input, after prior/
    run = tmp_path / "run"
    for folder, stage, finished in (
        ("prepared", "prepare", True),
        ("prior", "prior", False),
        (".proxy.new", "align", True),
    ):
        (run / folder).mkdir(parents=True)
        (run / folder / "artifact.json").write_text(json.dumps({"stage": stage, "hash": folder, "finished": finished}))
    (run / ".proxy.old").mkdir()
    with pytest.raises(ProxyKDError, match=r"prior is not finished"):
        _open("posterior", cfg)
    assert sorted(p.name for p in run.iterdir()) == [".proxy.new", ".proxy.old", "prepared", "prior"]


def test_a_finished_align_is_reused_after_a_change_of_the_schedule_only_distill_reads(tmp_path):
    """align runs each phase on its own schedule (align.sft_lr / dpo_lr, align.warmup_steps, the decay over the
    phase): lowering optim.warmup_steps, as distill's refusal may ask, refused a finished align as changed. A
    record made while align still depended on those fields is reused too; other optim fields still count."""
    folder = _model_folder(tmp_path / "model")
    cfg = _with(_cfg(tmp_path), "proxy.init_from", str(folder))
    art = _finished("align", cfg)
    assert _open("align", cfg).done
    for key, value in (("optim.warmup_steps", 7), ("optim.lr", 1e-2), ("optim.decay_steps", 50)):
        assert _open("align", _with(cfg.copy_and_resolve_references(), key, value)).done, key
    rec = read_record(art.path)  # as the version that recorded them wrote it
    rec["fields"].update({"optim.lr": 3e-4, "optim.warmup_steps": 100, "optim.decay_steps": 0})
    rec["hash"] = artifacts._hash(rec["fields"], rec["inputs"], rec["files"], rec["models"])
    record_path(art.path, False).write_text(json.dumps(rec))
    assert _open("align", _with(cfg.copy_and_resolve_references(), "optim.warmup_steps", 7)).done
    with pytest.raises(ProxyKDError, match=r"optim\.b2"):
        _open("align", _with(cfg.copy_and_resolve_references(), "optim.b2", 0.5))


def test_collect_fields_added_later_are_left_out_at_the_value_earlier_runs_computed_with(tmp_path):
    """A corpus collected before collect.token_limit and collect.send_sampling existed is not taken for
    another one: at their defaults they are not part of its settings."""
    cfg = _cfg(tmp_path)
    fields = artifacts.depends_on(cfg, specs.ARTIFACTS["collect"])
    assert "collect.token_limit" not in fields and "collect.send_sampling" not in fields
    cfg.collect.token_limit, cfg.collect.send_sampling = "max_completion_tokens", False
    fields = artifacts.depends_on(cfg, specs.ARTIFACTS["collect"])
    assert fields["collect.token_limit"] == "max_completion_tokens" and fields["collect.send_sampling"] is False
