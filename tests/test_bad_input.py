"""Bad input through the real CLI: every row is `python -m proxykd_jax <stage> --config=... --config.x=...`
in a subprocess, and must exit 2 with exactly one `error:` line on stderr that names the file, field or
step (and no traceback), leaving its run directory exactly as it was: nothing written, nothing lost.

Each row gets its own copy of one tiny run directory (prepared data, prior tables, a posterior store,
a student checkpoint), built once for the module; rows run in parallel. Rows marked `fast` must fail
before jax starts (no device line in the log): config checks cost no accelerator start-up.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import pathlib
import pickle
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from pipeline_fixtures import REPO, VOCAB, build_run
from stage_helpers import run_stage

from proxykd_jax.data.records import PreparedData
from proxykd_jax.data.store import StoreWriter
from proxykd_jax.teacher.backends import ToyBackend
from proxykd_jax.teacher.listen import ServerThread
from proxykd_jax.teacher.server import make_app
from proxykd_jax.teacher.wire import Faults

JAX_STARTED = "proxykd_jax.parallel.distributed"  # the log line that follows jax's start-up
MODEL_INIT = "compilation of jit(init)"  # JAX_LOG_COMPILES's line for a model's initialisation
WORKERS = 4


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    stage: str
    args: tuple[str, ...]  # --config.* overrides; {run} = this row's run dir, {base} = the fixture's
    expect: tuple[str, ...]  # substrings of the one error line ({busy_port}, ... filled in as in args)
    fast: bool = False  # fails in config validation, before jax starts
    setup: str = ""  # name of a function below that damages this row's copy of the run dir
    run_dir: str = "copy"  # copy | missing (must not be created) | empty
    may_write: bool = False  # collect keeps an unfinished, resumable record of what it did
    file_limit: int = 0  # > 0: every file of the process is capped at this many bytes (a full disk)


def flip_byte(path: pathlib.Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: pathlib.Path, keep: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


def _add_a_token(manifest):
    _edit_json(manifest, num_tokens=json.loads(manifest.read_text())["num_tokens"] + 1)


def _shards(run):
    return sorted((run / "posterior").glob("shard-*.bin"))


def _checkpoint_files(run):
    return sorted(p for p in (run / "student" / "checkpoints" / "3" / "state" / "d").iterdir())


def _edit_json(path: pathlib.Path, **changes) -> None:
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def _without(*names):
    """Removes the artifacts a stage would write: the fixture's store and checkpoint carry no record."""

    def remove(run):
        for name in names:
            shutil.rmtree(run / name)

    return remove


def _both(*steps):
    def run_all(run):
        for step in steps:
            step(run)

    return run_all


def _empty_split(*names):
    """Makes the prepared manifest say these splits hold nothing (as a corpus of too few prompts does)."""

    def empty(run):
        path = run / "prepared" / "manifest.json"
        manifest = json.loads(path.read_text())
        for name in names:
            manifest["splits"][name].update(samples=0, prompts=0, tokens=0, response_tokens=0, files=[])
        path.write_text(json.dumps(manifest))

    return empty


SETUPS = {
    "store_truncated": _both(lambda run: truncate(_shards(run)[0]), _without("student")),
    "store_flipped": _both(lambda run: flip_byte(_shards(run)[0]), _without("student")),
    "store_manifest_garbage": _both(
        lambda run: _shards(run)[0].with_suffix(".json").write_text('{"k": 8, "vocab'), _without("student")
    ),
    "ckpt_truncated": lambda run: [truncate(p, 0.3) for p in _checkpoint_files(run)],
    # The first byte of each data file (its zstd frame's magic): orbax keeps no checksums, so a flip
    # inside a stored (raw) block of float data reads back without error and is not detectable.
    "ckpt_flipped": lambda run: [flip_byte(p, at=0.0) for p in _checkpoint_files(run)],
    "ckpt_metadata_garbage": lambda run: (run / "student" / "checkpoints" / "3" / "state" / "_METADATA").write_text(
        "not json"
    ),
    "gpt2_folder": lambda run: _edit_json(
        run / "proxy_copy" / "config.json", architectures=["GPT2LMHeadModel"], model_type="gpt2"
    ),
    "wrong_shapes_folder": _both(
        lambda run: _edit_json(run / "proxy_copy" / "config.json", intermediate_size=48), _without("posterior")
    ),
    "truncated_weights": _both(
        lambda run: truncate(run / "proxy_copy" / "model.safetensors", 0.6), _without("posterior")
    ),
    "no_prior": _without("prior", "posterior"),
    "prior_flipped": _both(lambda run: flip_byte(run / "prior" / "tables.npz"), _without("posterior")),
    # valid JSON with one number changed: the data file's checksum holds, its sections would read wrong
    "store_manifest_count": _both(lambda run: _add_a_token(_shards(run)[0].with_suffix(".json")), _without("student")),
    "no_student": _without("student"),
    "no_prepared": _without("prepared"),
    "no_store": _without("posterior", "student"),
    "serve_folder_without_config": lambda run: (run / "proxy_copy" / "config.json").unlink(),
    "prepared_format_99": _both(
        lambda run: _edit_json(run / "prepared" / "manifest.json", format_version=99), _without("prior", "posterior")
    ),
    "distill_split_empty": _empty_split("distill"),
    "heldout_split_empty": _empty_split("heldout"),
    "align_split_empty": _empty_split("align"),
}

P = "--config.collect.prompts={{base}}/inputs/{}"
C = "--config.data.corpus={{base}}/inputs/{}"
SHARED_CORPUS = "--config.data.corpus={base}/run/corpus.jsonl"
COLLECT = (
    "--config.collect.model=toy",
    "--config.collect.backoff_initial_s=0.01",
    "--config.collect.backoff_max_s=0.05",
)

CASES = [
    # ---------------------------------------------------------------- collect
    Case("collect-prompts-missing", "collect", (P.format("nope.jsonl"),), ("collect.prompts", "does not exist"), True),
    Case(
        "collect-concurrency-0",
        "collect",
        (P.format("prompts.jsonl"), "--config.collect.concurrency=0"),
        ("collect.concurrency=0",),
        True,
    ),
    Case(
        "collect-max-attempts-0",
        "collect",
        (P.format("prompts.jsonl"), "--config.collect.max_attempts=0"),
        ("collect.max_attempts=0",),
        True,
    ),
    Case(
        "collect-prompts-not-utf8",
        "collect",
        (P.format("prompts_latin1.jsonl"), *COLLECT),
        ("prompts_latin1.jsonl line 2", "not UTF-8"),
    ),
    Case(
        "collect-prompt-id-list",
        "collect",
        (P.format("prompts_idlist.jsonl"), *COLLECT),
        ("line 1", "'id' must be a string or integer"),
    ),
    Case("collect-prompts-empty", "collect", (P.format("empty.jsonl"), *COLLECT), ("holds no prompts",)),
    Case(
        "collect-unreachable",
        "collect",
        (P.format("prompts.jsonl"), "--config.collect.base_url=http://127.0.0.1:9/v1", *COLLECT),
        ("cannot reach http://127.0.0.1:9/v1", "re-running the same command continues"),
        may_write=True,
    ),
    Case(
        "collect-always-500",
        "collect",
        (
            P.format("prompts.jsonl"),
            "--config.collect.base_url={server500}",
            "--config.collect.max_attempts=2",
            "--config.collect.breaker_failures=100",
            *COLLECT,
        ),
        ("2 failed", "re-running the same command"),
        may_write=True,
    ),
    Case(
        "collect-200-without-message",
        "collect",
        (
            P.format("prompts.jsonl"),
            "--config.collect.base_url={malformed}",
            "--config.collect.max_attempts=2",
            "--config.collect.breaker_failures=100",
            *COLLECT,
        ),
        ("2 failed", "re-running the same command"),
        may_write=True,
    ),
    Case(
        "collect-disk-full",
        "collect",
        (P.format("prompts30.jsonl"), "--config.collect.base_url={healthy}", *COLLECT),
        ("cannot write", "File too large", "re-running the same command continues"),
        may_write=True,
        file_limit=3000,  # room for the record and a few samples
    ),
    Case(
        "collect-disk-full-at-once",
        "collect",
        (P.format("prompts.jsonl"), "--config.collect.base_url={healthy}", *COLLECT),
        ("cannot write", "teacher.jsonl.artifact.json", "File too large"),
        file_limit=400,  # the lock fits, not the artifact's record
    ),
    # ---------------------------------------------------------------- prepare
    Case(
        "prepare-corpus-not-utf8",
        "prepare",
        (C.format("corpus_latin1.jsonl"),),
        ("corpus_latin1.jsonl:2", "byte 0xe9 at byte offset", "not UTF-8"),
        run_dir="empty",
    ),
    Case("prepare-corpus-empty", "prepare", (C.format("empty.jsonl"),), ("empty.jsonl", "no samples"), run_dir="empty"),
    Case(
        "prepare-corpus-blank-lines",
        "prepare",
        (C.format("blank.jsonl"),),
        ("blank.jsonl", "no samples"),
        run_dir="empty",
    ),
    Case(
        "prepare-corpus-id-list",
        "prepare",
        (C.format("corpus_idlist.jsonl"),),
        ("corpus_idlist.jsonl:1", "'id' is a list"),
        run_dir="empty",
    ),
    Case(
        "prepare-corpus-bad-json",
        "prepare",
        (C.format("corpus_badjson.jsonl"),),
        ("corpus_badjson.jsonl:2", "malformed JSON"),
        run_dir="empty",
    ),
    Case(
        "prepare-corpus-missing",
        "prepare",
        (C.format("nope.jsonl"),),
        ("config.data.corpus", "nope.jsonl"),
        True,
        run_dir="missing",
    ),
    Case(
        "prepare-tokenizer-missing",
        "prepare",
        (SHARED_CORPUS, "--config.data.tokenizer={base}/nope"),
        ("config.data.tokenizer", "does not exist"),
        True,
        run_dir="missing",
    ),
    Case(
        "prepare-split-sum",
        "prepare",
        (SHARED_CORPUS, "--config.data.split.heldout=0.5"),
        ("config.data.split", "sum to 1.4500"),
        True,
        run_dir="missing",
    ),
    Case(
        "prepare-split-negative",
        "prepare",
        (SHARED_CORPUS, "--config.data.split.heldout=-0.05", "--config.data.split.warmup=0.2"),
        ("config.data.split", "[0, 1]"),
        True,
        run_dir="missing",
    ),
    Case(
        "prepare-seq-len-0",
        "prepare",
        (SHARED_CORPUS, "--config.data.seq_len=0"),
        ("config.data.seq_len=0",),
        True,
        run_dir="missing",
    ),
    Case(
        "prepare-on-error-word",
        "prepare",
        (SHARED_CORPUS, "--config.data.on_error=ignore"),
        ("config.data.on_error='ignore'", "error, skip"),
        True,
        run_dir="missing",
    ),
    Case(
        "prepare-teacher-topk-negative",
        "prepare",
        (SHARED_CORPUS, "--config.data.teacher_topk=-1"),
        ("config.data.teacher_topk=-1", "at least 1"),
        True,
        run_dir="missing",
    ),
    Case(
        "prepare-teacher-topk-0",
        "prepare",
        (SHARED_CORPUS, "--config.data.teacher_topk=0"),
        ("config.data.teacher_topk=0", "does not switch it off", "posterior.use_teacher_topk=False"),
        True,
        run_dir="missing",
    ),
    Case(
        "prepare-store-value-dtype-word",
        "prepare",
        (SHARED_CORPUS, "--config.data.store.value_dtype=int4"),
        ("config.data.store.value_dtype='int4'", "uint8"),
        True,
        run_dir="missing",
    ),
    Case(
        "prepare-no-corpus-at-all",
        "prepare",
        ("--config.data.corpus=",),
        ("corpus", "run `proxykd collect` first"),
        True,
        run_dir="missing",
    ),
    # ---------------------------------------------------------------- prior
    Case("prior-no-prepared-data", "prior", (), ("prepared", "run `proxykd prepare` first"), True, run_dir="missing"),
    Case("prior-unknown-field", "prior", ("--config.prior.no_such_field=1",), ("bad config override",), True),
    Case("prior-bad-value-type", "prior", ("--config.prior.kappa=lots",), ("bad config override",), True),
    Case(
        "prior-prepared-format-version",
        "prior",
        (),
        ("manifest.json: format_version 99 is not 1", "re-run `proxykd prepare`"),
        setup="prepared_format_99",
    ),
    # ---------------------------------------------------------------- align
    Case("align-mesh-does-not-divide", "align", ("--config.mesh.shape.fsdp=3",), ("mesh", "8 available")),
    Case("align-mesh-two-fill-axes", "align", ("--config.mesh.shape.data=-1",), ("mesh.shape", "at most one -1")),
    Case("align-batch-size-0", "align", ("--config.align.batch_size=0",), ("config.align.batch_size=0",), True),
    Case("align-bad-loss-type", "align", ("--config.align.loss_type=kto",), ("config.align.loss_type",), True),
    Case("align-bad-reference", "align", ("--config.align.reference=sft",), ("config.align.reference",), True),
    Case(
        "align-batch-not-multiple-of-mesh",
        "align",
        ("--config.align.batch_size=4",),
        ("config.align.batch_size=4", "multiple of 8"),
    ),
    Case(
        "align-warmup-smaller-than-batch",
        "align",
        ("--config.align.batch_size=64", "--config.align.prompts_per_round=0"),
        ("split 'warmup' has only", "fewer than align.batch_size=64", "lower --config.align.batch_size"),
    ),
    Case(
        "align-split-empty",
        "align",
        ("--config.align.sft_steps=0",),
        ("split 'align' has no samples", "--config.align.rounds=0", "data.split.align"),
        setup="align_split_empty",
    ),
    Case(
        "align-round-pairs-below-batch",
        "align",
        ("--config.align.prompts_per_round=2",),
        ("align.prompts_per_round=2", "align.batch_size=8"),
        True,
    ),
    Case(
        "align-init-from-missing",
        "align",
        ("--config.proxy.init_from={run}/nope",),
        ("config.proxy.init_from", "does not exist"),
        True,
    ),
    Case(
        "align-unsupported-architecture",
        "align",
        ("--config.proxy.init_from={run}/proxy_copy",),
        ("proxy_copy", "Unsupported architecture", "GPT2LMHeadModel"),
        setup="gpt2_folder",
    ),
    Case("align-heads-vs-kv-heads", "align", ("--config.proxy.num_kv_heads=3",), ("num_kv_heads=3",), True),
    Case(
        "align-scan-layers-word",
        "align",
        ("--config.proxy.scan_layers=sometimes",),
        ("config.proxy.scan_layers must be True, False or 'auto'",),
        True,
    ),
    # ---------------------------------------------------------------- posterior
    Case(
        "posterior-weights-vs-config-json",
        "posterior",
        ("--config.posterior.proxy={run}/proxy_copy",),
        ("proxy_copy", "has shape", "config.json"),
        setup="wrong_shapes_folder",
    ),
    Case(
        "posterior-truncated-weights",
        "posterior",
        ("--config.posterior.proxy={run}/proxy_copy",),
        ("proxy_copy", "cannot be loaded"),
        setup="truncated_weights",
    ),
    Case("posterior-no-prior", "posterior", (), ("prior", "run `proxykd prior` first"), True, setup="no_prior"),
    Case(
        "posterior-prior-bit-flipped",
        "posterior",
        ("--config.posterior.proxy={run}/proxy_copy",),
        ("tables.npz", "damaged", "re-run `proxykd prior`"),
        setup="prior_flipped",
    ),
    Case(
        "posterior-unknown-kernel",
        "posterior",
        ("--config.posterior.kernel=triton",),
        ("config.posterior.kernel='triton'", "xla, pallas"),
        True,
    ),
    Case(
        "posterior-batch-size-0", "posterior", ("--config.posterior.batch_size=0",), ("posterior.batch_size=0",), True
    ),
    Case(
        "posterior-proxy-missing",
        "posterior",
        ("--config.posterior.proxy={run}/nope",),
        ("config.posterior.proxy", "does not exist"),
        True,
    ),
    # ---------------------------------------------------------------- distill
    Case("distill-batch-size-0", "distill", ("--config.train.batch_size=0",), ("config.train.batch_size=0",), True),
    Case("distill-batch-size-negative", "distill", ("--config.train.batch_size=-8",), ("train.batch_size=-8",), True),
    Case("distill-steps-0", "distill", ("--config.train.steps=0",), ("config.train.steps=0",), True),
    Case(
        "distill-warmup-past-steps",
        "distill",
        ("--config.optim.warmup_steps=6",),
        ("optim.warmup_steps=6", "train.steps=6"),
        True,
    ),
    Case(
        "distill-batch-not-multiple-of-mesh",
        "distill",
        ("--config.train.batch_size=12",),
        ("train.batch_size=12", "multiple of 8"),
    ),
    Case("distill-mesh-tensor-3", "distill", ("--config.mesh.shape.tensor=3",), ("mesh", "change mesh.shape")),
    Case(  # a larger student vocabulary than the proxy's is fine (padded embeddings); one below the tokenizer's not
        "distill-vocab-below-tokenizer",
        "distill",
        ("--config.model.vocab_size=64",),
        ("config.model.vocab_size=64", f"{VOCAB} tokens of the prepared tokenizer"),
        setup="no_student",
    ),
    Case(
        "distill-store-shard-truncated",
        "distill",
        (),
        ("shard-", "sha256", "re-run `proxykd posterior`"),
        setup="store_truncated",
    ),
    Case("distill-store-shard-bit-flipped", "distill", (), ("shard-", "sha256"), setup="store_flipped"),
    Case("distill-store-manifest-garbage", "distill", (), ("shard-", "not valid JSON"), setup="store_manifest_garbage"),
    Case(
        "distill-store-manifest-count", "distill", (), ("shard-", "manifest is damaged"), setup="store_manifest_count"
    ),
    Case("distill-no-store", "distill", (), ("posterior", "run `proxykd posterior` first"), True, setup="no_store"),
    Case(
        "distill-split-empty",
        "distill",
        ("--config.distill.loss.alpha=0",),
        ("split 'distill' has no samples", "more prompts", "data.split.distill"),
        setup="distill_split_empty",
    ),
    Case(
        "distill-split-word",
        "distill",
        ("--config.distill.split=train",),
        ("config.distill.split='train'", "warmup, align, distill, heldout"),
        True,
    ),
    Case(
        "distill-divergence-word",
        "distill",
        ("--config.distill.loss.divergence=kl",),
        ("config.distill.loss.divergence='kl'", "forward_kl"),
        True,
    ),
    # ---------------------------------------------------------------- eval
    Case(
        "eval-known-teacher-missing",
        "eval",
        ("--config.eval.known_teacher={run}/nope",),
        ("config.eval.known_teacher", "does not exist"),
        True,
    ),
    Case("eval-batch-size-0", "eval", ("--config.eval.batch_size=0",), ("config.eval.batch_size=0",), True),
    Case("eval-no-prepared-data", "eval", (), ("prepared", "run `proxykd prepare` first"), True, setup="no_prepared"),
    Case(
        "eval-split-unknown",
        "eval",
        ("--config.eval.split=test",),
        ("config.eval.split='test'", "warmup, align, distill, heldout"),
        True,
    ),
    Case(
        "eval-heldout-empty",
        "eval",
        (),
        ("split 'heldout' has no samples", "--config.eval.split", "data.split.heldout"),
        setup="heldout_split_empty",
    ),
    # ---------------------------------------------------------------- export
    Case(
        "export-checkpoint-truncated",
        "export",
        (),
        ("checkpoint step 3", "delete", "run.overwrite"),
        setup="ckpt_truncated",
    ),
    Case(
        "export-checkpoint-bit-flipped",
        "export",
        (),
        ("checkpoint step 3", "delete", "run.overwrite"),
        setup="ckpt_flipped",
    ),
    Case("export-checkpoint-metadata-garbage", "export", (), ("checkpoint step 3",), setup="ckpt_metadata_garbage"),
    Case("export-step-not-saved", "export", ("--config.export.step=5",), ("export.step=5", "[3]")),
    Case("export-no-student", "export", (), ("student", "run `proxykd distill` first"), True, setup="no_student"),
    # ---------------------------------------------------------------- serve
    Case(
        "serve-path-missing",
        "serve",
        ("--config.serve.path={run}/nope",),
        ("config.serve.path", "does not exist"),
        True,
    ),
    Case(
        "serve-path-not-a-model",
        "serve",
        ("--config.serve.path={run}/proxy_copy",),
        ("serve.path", "config.json"),
        setup="serve_folder_without_config",
    ),
    Case(
        "serve-max-batch-0",
        "serve",
        ("--config.serve.path={run}/proxy_copy", "--config.serve.max_batch=0"),
        ("serve.max_batch=0",),
        True,
    ),
    Case(
        "serve-port-in-use",
        "serve",
        ("--config.serve.path={run}/proxy_copy", "--config.serve.port={busy_port}"),
        ("port {busy_port} is in use", "--config.serve.port"),
    ),
    Case(
        "serve-port-out-of-range",
        "serve",
        ("--config.serve.path={run}/proxy_copy", "--config.serve.port=70000"),
        ("config.serve.port=70000", "at most 65535"),
        True,
    ),
    Case(
        "serve-request-log-folder-missing",
        "serve",
        ("--config.serve.path={run}/proxy_copy", "--config.serve.request_log={run}/nope/requests.jsonl"),
        ("serve.request_log=", "folder that does not exist"),
    ),
    # ---------------------------------------------------------------- demo
    Case(
        "demo-num-prompts-0", "demo", ("--config.demo.num_prompts=0",), ("demo.num_prompts=0",), True, run_dir="missing"
    ),
    Case("demo-mesh-two-fill-axes", "demo", ("--config.mesh.shape.tensor=-1",), ("at most one -1",), run_dir="missing"),
    Case("demo-steps-negative", "demo", ("--config.train.steps=-1",), ("train.steps=-1",), True, run_dir="missing"),
    # ---------------------------------------------------------------- choose
    Case("choose-field-fixed", "choose", ("--config.choose.field=posterior.proxy",), ("cannot be chosen",), True),
    Case(
        "choose-candidate-not-a-number",
        "choose",
        ("--config.choose.field=distill.loss.alpha", "--config.choose.candidates=0.5,half"),
        ("config.choose.candidates", "'half'", "a finite number"),
        True,
    ),
    Case(
        "choose-split-unknown",
        "choose",
        (
            "--config.choose.field=distill.loss.alpha",
            "--config.choose.candidates=0.5,1",
            "--config.choose.eval_every=3",
            "--config.choose.eval_split=x",
        ),
        ("config.choose.eval_split='x'", "must be one of"),
        True,
    ),
    # ---------------------------------------------------------------- report
    Case("report-variant-unknown", "report", ("--config.report.variants=sft,nope",), ("report.variants", "nope")),
    Case("report-seeds-not-integers", "report", ("--config.report.seeds=0,x",), ("comma-separated integers",), True),
]


def _write_inputs(folder: pathlib.Path) -> None:
    folder.mkdir()
    row = {"id": "p0", "prompt": "hello there", "responses": ["general kenobi"]}
    (folder / "prompts.jsonl").write_text('{"id": "a", "prompt": "hello"}\n{"id": "b", "prompt": "world"}\n')
    (folder / "prompts30.jsonl").write_text("".join(f'{{"id": "p{i}", "prompt": "prompt {i}"}}\n' for i in range(30)))
    (folder / "prompts_latin1.jsonl").write_bytes(b'{"id": "a", "prompt": "ok"}\n{"id": "b", "prompt": "caf\xe9"}\n')
    (folder / "prompts_idlist.jsonl").write_text('{"id": ["a"], "prompt": "hello"}\n')
    (folder / "empty.jsonl").write_text("")
    (folder / "blank.jsonl").write_text("\n  \n\n")
    (folder / "corpus_latin1.jsonl").write_bytes(
        (json.dumps(row) + "\n").encode() + b'{"id": "p1", "prompt": "caf\xe9", "responses": ["x y"]}\n'
    )
    (folder / "corpus_idlist.jsonl").write_text(json.dumps(row | {"id": ["p0"]}) + "\n")
    (folder / "corpus_badjson.jsonl").write_text(json.dumps(row) + '\n{"id": "p1", "prompt": "x",\n')


def _write_store(run: pathlib.Path, cfg) -> None:
    """A real posterior store (two shards) for the distill split, from random top-K rows."""
    prepared = PreparedData(run / "prepared")
    rng = np.random.default_rng(0)
    writer = StoreWriter.from_config(
        run / "posterior", cfg.data.store, vocab_size=VOCAB, tokenizer_hash=prepared.tokenizer_hash
    )
    for sample_id in np.load(run / "prepared" / "distill" / "sample_ids.npy")[:2]:
        t = 5
        ids = np.stack([rng.permutation(VOCAB)[: cfg.data.store.k] for _ in range(t)])
        lp = np.log(rng.dirichlet(np.ones(cfg.data.store.k + 1), t))[:, :-1]
        writer.add(int(sample_id), ids, lp, 1.0 - np.exp(lp).sum(-1))
        writer.flush()  # one sample per shard: a damaged row names one shard of several
    writer.close()


def _write_checkpoint(run: pathlib.Path, cfg) -> None:
    """A student train-state checkpoint at step 3, as `distill` writes one."""
    from flax import nnx

    from proxykd_jax import parallel, train
    from proxykd_jax.models.llama import Llama, ModelConfig

    mesh, rules = parallel.make_mesh(cfg.mesh), parallel.normalize_rules(cfg.mesh.rules)
    optimizer = train.make_optimizer(cfg.optim, cfg.train.steps)
    _, state, _ = train.create_train_state(
        optimizer, mesh, rules, Llama, ModelConfig.from_config(cfg.model), rngs=nnx.Rngs(0)
    )
    ckpt = train.Checkpointer(run / "student" / "checkpoints", keep=2)
    ckpt.save(3, state)
    ckpt.close()


def snapshot(root: pathlib.Path) -> dict[str, tuple]:
    """Every path under `root` with its kind, size and content hash (folders too)."""
    if not root.exists():
        return {}
    out = {".": ("dir",)}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = ("dir",) if path.is_dir() else ("file", path.stat().st_size, hash(path.read_bytes()))
    return out


def _run_case(case: Case, base: pathlib.Path, servers: dict) -> dict:
    run = base / "cases" / case.id
    if case.run_dir == "copy":
        shutil.copytree(base / "run", run, ignore=shutil.ignore_patterns("teacher*", "corpus.jsonl"))
        shutil.copytree(base / "run" / "proxy_init", run / "proxy_copy")
        if case.setup:
            SETUPS[case.setup](run)
    elif case.run_dir == "empty":
        run.mkdir(parents=True)
    before = snapshot(run)
    fmt = dict(run=run, base=base, **servers)
    # Python ignores SIGXFSZ, so a write past RLIMIT_FSIZE fails with EFBIG, as a full disk fails with ENOSPC
    small_disk = (
        "import resource, runpy, sys; limit = int(sys.argv.pop(1)); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)); "
        "runpy.run_module('proxykd_jax', run_name='__main__', alter_sys=True)"
    )
    launcher = ["-c", small_disk, str(case.file_limit)] if case.file_limit else ["-m", "proxykd_jax"]
    argv = [
        sys.executable,
        *launcher,
        case.stage,
        f"--config={REPO}/tests/pickled_config.py:{base / 'cfg.pkl'}",
        f"--config.run.dir={run}",
        *(a.format(**fmt) for a in case.args),
    ]
    env = os.environ | {"PYTHONPATH": str(REPO), "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    env |= {"JAX_PLATFORMS": "cpu", "JAX_LOG_COMPILES": "1"}  # jax names each program it compiles
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env, timeout=240)
    return dict(
        proc=proc, before=before, after=snapshot(run), seconds=time.perf_counter() - start, run=run, argv=argv, fmt=fmt
    )


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad_input")
    cfg, _ = build_run(base / "run")
    with cfg.unlocked():
        cfg.posterior.proxy = ""
        cfg.train.checkpoint_every = 3
    run_stage("prior", cfg)
    _write_store(base / "run", cfg)
    _write_checkpoint(base / "run", cfg)
    _write_inputs(base / "inputs")
    with open(base / "cfg.pkl", "wb") as f:
        pickle.dump(cfg, f)
    shared_before = snapshot(base / "run")
    server500 = ServerThread(make_app(ToyBackend(), Faults(fail_500_rate=1.0)))
    malformed = ServerThread(make_app(ToyBackend(), Faults(malformed_rate=1.0)))
    healthy = ServerThread(make_app(ToyBackend()))
    with server500 as s500, malformed as smal, healthy as ok:
        servers = {"server500": s500.base_url, "malformed": smal.base_url, "healthy": ok.base_url}
        servers["busy_port"] = str(ok.port)  # a port something listens on
        with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
            futures = {case.id: pool.submit(_run_case, case, base, servers) for case in CASES}
            out = {name: f.result() for name, f in futures.items()}
        control = Case("export-control", "export", ("--config.export.out={run}/exported",), ())
        out["_control"] = _run_case(control, base, servers)
    out["_shared"] = (shared_before, snapshot(base / "run"))
    return out


def test_the_table_covers_every_stage_with_at_least_40_rows():
    from proxykd_jax.stages import STAGES

    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)
    assert {c.stage for c in CASES} == set(STAGES)
    assert sum(c.fast for c in CASES) > len(CASES) / 2  # most rows fail before jax starts


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_exits_2_with_one_sentence_and_writes_nothing(case, results):
    res = results[case.id]
    proc, err = res["proc"], res["proc"].stderr
    assert proc.returncode == 2, f"{' '.join(res['argv'])}\nexit {proc.returncode}\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err[-3000:]
    line = lines[0]
    assert line.startswith(f"error: proxykd {case.stage}: "), line
    for want in case.expect:
        want = want.format(**res["fmt"])  # {run}, {busy_port}, ... as in the row's args
        assert want in line, f"{want!r} not in {line!r}"
    if case.fast:
        assert JAX_STARTED not in err, f"{case.id} started jax before refusing: {err[-2000:]}"
    # bad input is refused before the long work: no row builds a model (a damaged store was once found only
    # after the student's state was initialised)
    assert MODEL_INIT not in err, f"{case.id} built a model before refusing: {err[-2000:]}"
    before, after = res["before"], res["after"]
    assert {k: v for k, v in after.items() if k in before} == before, "a file was changed or lost"
    if not case.may_write:
        assert after == before, f"{case.id} wrote {sorted(set(after) - set(before))}"


def test_the_fixture_is_sound_and_was_not_touched(results):
    """The undamaged fixture exports (so the checkpoint rows fail on the damage alone), and no row
    wrote into the shared run directory."""
    shared_before, shared_after = results["_shared"]
    assert shared_after == shared_before
    control = results["_control"]
    assert control["proc"].returncode == 0, control["proc"].stderr[-3000:]
    # jax logs its compilations in the words MODEL_INIT looks for (the rows' check could not fail otherwise)
    assert MODEL_INIT.replace("init)", "") in control["proc"].stderr, control["proc"].stderr[-3000:]
    assert (control["run"] / "exported" / "config.json").exists()
