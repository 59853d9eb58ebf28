"""A student and a proxy that share one tokenizer but pad their embeddings to different sizes (as
Qwen2.5-0.5B's 151,936 rows and Qwen2.5-7B's 152,064 for 151,665 tokens): here a 270-token tokenizer,
a student of 288 rows and a proxy of 320, through prior -> posterior -> distill -> eval."""

from __future__ import annotations

import json
import pathlib
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx
from pipeline_fixtures import tiny_config, tiny_teacher
from stage_helpers import run_stage

from proxykd_jax import cli, context, data
from proxykd_jax import config as config_lib
from proxykd_jax.bayes import estimate
from proxykd_jax.bayes.tables import load_prior
from proxykd_jax.context import RunPaths
from proxykd_jax.data.records import PreparedData
from proxykd_jax.data.store import StoreReader, StoreWriter
from proxykd_jax.errors import ConfigError, ProxyKDError
from proxykd_jax.eval import benchmark
from proxykd_jax.eval.known_teacher import kl_terms
from proxykd_jax.models import hf
from proxykd_jax.models.llama import Llama, ModelConfig
from proxykd_jax.models.tokenizer import build_word_tokenizer
from proxykd_jax.train import distill as distill_lib

TOKENS, STUDENT, PROXY = 270, 288, 320


def log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def padded_folder(src: pathlib.Path, dst: pathlib.Path, rows: int) -> None:
    """The Hugging Face folder `src` with its embedding and output padded to `rows` ids; the extra rows
    are random and larger than the others, so that an unmasked padded id would win the top-k."""
    shutil.copytree(src, dst)
    rng = np.random.default_rng(0)
    for path in dst.glob("*.safetensors"):
        tensors = safetensors.numpy.load_file(path)
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            w = tensors.get(name)
            if w is not None:
                pad = (rng.normal(size=(rows - w.shape[0], w.shape[1])) * 3 * w.std()).astype(w.dtype)
                tensors[name] = np.concatenate([w, pad])
        safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["vocab_size"] = rows
    (dst / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(cfg, teacher): prepared data of a 270-token tokenizer, its prior tables and the posterior store
    written from the proxy padded to 320 (the student's group: 288 rows)."""
    root = tmp_path_factory.mktemp("padded_vocab")
    cfg = tiny_config(root / "run")
    teacher = tiny_teacher(cfg, root, TOKENS)
    prompts = teacher.make_prompts(24, np.random.default_rng(0), min_words=3, max_words=8)
    with open(root / "corpus.jsonl", "w") as f:
        for i, (p, rs) in enumerate(zip(prompts, teacher.sample(prompts, 3, 10, seed=1))):
            if any(r.strip() for r in rs):
                f.write(json.dumps({"id": f"p{i}", "prompt": p, "responses": [r for r in rs if r.strip()]}) + "\n")
    benchmark.perturbed_proxy(teacher, root / "proxy_tok", 0.15, 5)
    padded_folder(root / "proxy_tok", root / "proxy", PROXY)
    with cfg.unlocked():
        cfg.data.corpus, cfg.data.tokenizer = str(root / "corpus.jsonl"), str(root / "proxy")
        cfg.data.split.update(warmup=0.0, align=0.0, distill=0.75, heldout=0.25)
        cfg.data.num_epochs = 0
        cfg.data.store.value_dtype = "float32"
        cfg.proxy.vocab_size, cfg.model.vocab_size = PROXY, STUDENT
        cfg.proxy.init_from = cfg.posterior.proxy = str(root / "proxy")
        cfg.train.steps, cfg.train.checkpoint_every, cfg.train.log_every = 2, 0, 1
        cfg.eval.known_teacher = str(root / "teacher")
    for stage in ("prepare", "prior", "posterior"):
        run_stage(stage, cfg)
    return cfg, teacher


@pytest.fixture(scope="module")
def distilled(run):
    """`run` with the 288-row student distilled from the store for two steps."""
    run_stage("distill", run[0])
    return run


def test_validate_accepts_differently_padded_vocabularies():
    cfg = config_lib.base_config()
    cfg.run.dir = "runs/padded"
    cfg.model.vocab_size, cfg.proxy.vocab_size = STUDENT, PROXY
    for stage in ("align", "posterior", "distill", "eval", "export", None):
        config_lib.validate(cfg, stage)  # each model is checked against the tokenizer where that is known


def test_hf_folders_padded_to_different_sizes_make_a_valid_config(tmp_path, monkeypatch):
    """configs/hf.py reads each folder's rows (as Qwen2.5-0.5B's 151,936 and 7B's 152,064): the config validates."""
    shape = dict(d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, d_ff=32, max_seq_len=64)
    tokenizer = build_word_tokenizer([f"w{i}" for i in range(60)])  # 64 tokens
    for name, rows in (("student", 72), ("proxy", 80)):
        model_cfg = ModelConfig(vocab_size=rows, **shape)
        hf.save_hf(Llama(model_cfg, rngs=nnx.Rngs(0)), model_cfg, tmp_path / name, tokenizer=tokenizer)
    argv = [f"--config=configs/hf.py:{tmp_path / 'student'},{tmp_path / 'proxy'}"]
    monkeypatch.setattr(sys, "argv", ["proxykd", "distill", *argv])  # ml_collections reads overrides there
    cfg = cli.load_config("distill", argv)
    assert (cfg.model.vocab_size, cfg.proxy.vocab_size) == (72, 80)
    for stage in ("align", "posterior", "distill", None):
        config_lib.validate(cfg, stage)


def test_store_ids_index_the_tokenizer(run):
    """The store records the tokenizer's size (what its ids index), not the proxy's; no stored id, not
    even of an absent entry, is a padded one."""
    cfg, _ = run
    paths = RunPaths.from_config(cfg)
    store = StoreReader(paths.posterior)
    assert store.vocab_size == TOKENS
    ids = np.concatenate([store.get(int(s)).ids_TxK for s in store.sample_ids])
    assert ids.size and 0 <= ids.min() and ids.max() < TOKENS


def test_store_k_past_the_tokenizer_keeps_padded_ids_out(run, tmp_path):
    """With more top-k slots than tokens the last ones hold no probability; they must still name a
    token, or the 288-row student could not index the store (the proxy pads ids 270..319)."""
    cfg = run[0].copy_and_resolve_references()
    paths = RunPaths.from_config(cfg)
    prepared, tables = PreparedData(paths.prepared), load_prior(paths.prior)
    est = json.loads((paths.posterior / "estimate.json").read_text())
    with cfg.unlocked():
        cfg.data.store.k = TOKENS + 10
    with context.create(cfg, "posterior", lock=False) as ctx:
        _, proxy = ctx.load_model(cfg.posterior.proxy)
        sizes = dict(mesh=ctx.mesh, rules=ctx.rules, seq_len=cfg.data.seq_len, batch_size=cfg.posterior.batch_size)
        estimate.write_store(prepared, tables, est, proxy, cfg.posterior, cfg.data, out=tmp_path, seed=0, **sizes)
    store = StoreReader(tmp_path)
    entries = [store.get(int(s)) for s in store.sample_ids]
    ids = np.concatenate([e.ids_TxK for e in entries])
    lps = np.concatenate([e.logprobs_TxK for e in entries])
    assert ids.max() < TOKENS and np.isinf(lps[:, TOKENS:]).all()
    np.testing.assert_allclose(np.exp(lps.astype(np.float64)).sum(1), 1.0, atol=1e-4)


def test_resuming_a_store_begun_before_keeps_its_vocab_size(run, tmp_path):
    """A store half written by the code before (vocab_size = the proxy's 320) resumes as one store."""
    cfg = run[0]
    paths = RunPaths.from_config(cfg)
    prepared, tables = PreparedData(paths.prepared), load_prior(paths.prior)
    new = StoreReader(paths.posterior)
    first = int(new.sample_ids[0])
    with StoreWriter(
        tmp_path, k=new.k, vocab_size=PROXY, tokenizer_hash=new.tokenizer_hash, value_dtype="float32"
    ) as w:
        e = new.get(first)
        w.add(first, e.ids_TxK, e.logprobs_TxK, e.tail_T, e.weight)
    est = json.loads((paths.posterior / "estimate.json").read_text())
    with context.create(cfg, "posterior", lock=False) as ctx:
        _, proxy = ctx.load_model(cfg.posterior.proxy)
        sizes = dict(mesh=ctx.mesh, rules=ctx.rules, seq_len=cfg.data.seq_len, batch_size=cfg.posterior.batch_size)
        written = estimate.write_store(
            prepared, tables, est, proxy, cfg.posterior, cfg.data, out=tmp_path, seed=0, **sizes
        )
    resumed = StoreReader(tmp_path)
    assert resumed.vocab_size == PROXY and written == len(new) - 1 and len(resumed) == len(new)


def test_distill_loss_with_padded_vocabularies_matches_a_dense_reference(distilled):
    """The 288-row student on batches of the store the 320-row proxy wrote: the loss equals CE plus
    alpha times the weighted forward KL (top-k + tail, the student's padded ids in its tail), computed
    here from the student's full float64 distributions. Student weights and batch order are fresh."""
    cfg, _ = distilled
    paths = RunPaths.from_config(cfg)
    metrics = [json.loads(line) for line in (paths.student("student") / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    assert len(steps) == 2 and all(np.isfinite(m["loss"]) and m["kd"] > 0 for m in steps)

    rng = np.random.default_rng()
    cfg = cfg.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.data.shuffle_seed = int(rng.integers(1 << 30))
    batch = next(
        iter(
            data.make_dataset(
                paths.prepared,
                "distill",
                cfg.data,
                store=paths.posterior,
                vocab_size=STUDENT,
                batch_size=8,
                process_index=0,
                process_count=1,
            )
        )
    )
    assert batch["kd_ids"].max() < TOKENS and batch["loss_mask"].sum() > 0
    model_cfg, key = ModelConfig.from_config(cfg.model), jax.random.key(int(rng.integers(1 << 30)))
    model = nnx.jit(lambda k: Llama(model_cfg, rngs=nnx.Rngs(params=k)))(key)  # (one compile, not one per op)
    jbatch = {k: jnp.asarray(v) for k, v in batch.items() if v.dtype != np.int64}
    loss, got = nnx.jit(distill_lib.make_loss_fn(cfg.distill.loss))(model, jbatch)

    logits = nnx.jit(lambda m, b: m(b["tokens"], b["positions"], b["segment_ids"]))(model, jbatch)
    logits = np.asarray(logits, np.float64)
    assert logits.shape[-1] == STUDENT
    logq = log_softmax(logits)
    mask = batch["loss_mask"].astype(np.float64)
    ce = -np.take_along_axis(logq, batch["targets"][..., None], -1)[..., 0]
    lp = batch["kd_logprobs"].astype(np.float64)
    valid = np.isfinite(lp)
    logq_k = np.take_along_axis(logq, batch["kd_ids"], -1)
    top = np.where(valid, np.exp(np.where(valid, lp, 0.0)) * (np.where(valid, lp, 0.0) - logq_k), 0.0).sum(-1)
    tail = batch["kd_tail"].astype(np.float64)
    q_tail = 1.0 - np.where(valid, np.exp(logq_k), 0.0).sum(-1)
    kd = top + np.where(tail > 0, tail * (np.log(np.maximum(tail, 1e-300)) - np.log(q_tail)), 0.0)
    n = mask.sum()
    alpha = float(cfg.distill.loss.alpha)
    want_ce, want_kd = (ce * mask).sum() / n, (kd * batch["weight"] * mask).sum() / n
    np.testing.assert_allclose(float(got["ce"]), want_ce, rtol=1e-4)
    np.testing.assert_allclose(float(got["kd"]), want_kd, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(float(loss), want_ce + alpha * want_kd, rtol=1e-3)


def test_a_model_vocabulary_below_the_tokenizer_is_refused_before_work(run):
    cfg, _ = run
    paths = RunPaths.from_config(cfg)
    small = cfg.copy_and_resolve_references()
    with small.unlocked():
        small.model.vocab_size = 250
        small.distill.output = "student_small"
        small.proxy.vocab_size, small.proxy.init_from = 250, ""
    for stage, field in (("distill", "model"), ("align", "proxy")):
        with pytest.raises(ProxyKDError) as err:
            run_stage(stage, small)
        message = str(err.value)
        assert f"config.{field}.vocab_size=250" in message and f"{TOKENS}" in message and "\n" not in message
    assert not paths.student("student_small").exists() and not paths.proxy.exists()  # nothing begun


def test_old_stores_read_and_a_store_past_the_student_is_refused(run, tmp_path):
    """A store written before (its vocab_size the proxy's, equal to the student's) still reads; one whose
    ids may reach past the student's rows is refused with one sentence."""
    cfg, _ = run
    paths = RunPaths.from_config(cfg)
    prepared = PreparedData(paths.prepared)
    new = StoreReader(paths.posterior)
    for size in (STUDENT, PROXY):
        with StoreWriter(tmp_path / str(size), k=new.k, vocab_size=size, tokenizer_hash=new.tokenizer_hash) as w:
            for sid in new.sample_ids:
                e = new.get(int(sid))
                w.add(int(sid), e.ids_TxK, e.logprobs_TxK, e.tail_T, e.weight)
    reader = data.open_store(prepared, tmp_path / str(STUDENT), STUDENT)
    assert reader.vocab_size == STUDENT
    with pytest.raises(ProxyKDError, match=f"{PROXY}.*{STUDENT}") as err:
        data.open_store(prepared, tmp_path / str(PROXY), STUDENT)
    assert "\n" not in str(err.value)


def test_kl_terms_compare_distributions_of_different_widths():
    rng = np.random.default_rng()
    q = rng.dirichlet(np.ones(TOKENS), (2, 3))
    logp = log_softmax(rng.normal(size=(2, 3, STUDENT)) * 2)
    want = np.sum(q * (np.log(q) - logp[..., :TOKENS]), -1)
    np.testing.assert_allclose(kl_terms(q, logp), want, rtol=1e-12)
    wide = np.concatenate([q, np.zeros((2, 3, PROXY - TOKENS))], -1)  # a teacher padded past the model
    np.testing.assert_allclose(kl_terms(wide, logp), want, rtol=1e-12)
    wide[0, 0, -1] = 0.5
    assert np.isinf(kl_terms(wide, logp)[0, 0]) and np.isfinite(kl_terms(wide, logp)[1]).all()


def test_eval_scores_the_padded_student_and_proxy(distilled):
    """Known-teacher metrics compare the teacher's 270-token distributions with the proxy's 320 and the
    student's 288, and the student's generations never draw a padded id."""
    cfg, _ = distilled
    metrics = run_stage("eval", cfg)
    models = metrics["models"]
    assert {"proxy (before align)", "student (Proxy-KD)"} <= set(models)
    for m in models.values():
        assert np.isfinite(m["heldout_nll"]) and np.isfinite(m["kl_to_teacher"])
    assert np.isfinite(models["student (Proxy-KD)"]["teacher_loglik_of_generations"])
    assert all(np.isfinite(v) for v in metrics["estimator_kl"].values())
    # the proxy's held-out NLL is over the tokenizer's 270 ids (as the posterior and sampling take it), not
    # its 320 rows: a float64 reference from the proxy's logits on the same held-out samples
    from proxykd_jax.eval import metrics as metrics_lib

    _, proxy = hf.load_hf(pathlib.Path(cfg.proxy.init_from))
    prepared = PreparedData(RunPaths.from_config(cfg).prepared)
    batches = metrics_lib.eval_batches(
        prepared, cfg.eval.split, cfg.data, batch_size=cfg.eval.batch_size, limit=cfg.eval.max_samples
    )
    forward = nnx.jit(lambda m, *rows: m(*rows))  # (one compile; op by op, a forward costs seconds of dispatch)
    nll = n = 0.0
    for b in batches:
        logits = np.asarray(forward(proxy, *(jnp.asarray(b[k]) for k in ("tokens", "positions", "segment_ids"))))
        logp = log_softmax(logits.astype(np.float64)[..., :TOKENS])
        picked = np.take_along_axis(logp, np.asarray(b["targets"])[..., None], -1)[..., 0]
        mask = np.asarray(b["loss_mask"], np.float64) * (np.asarray(b["segment_ids"]) > 0)
        nll, n = nll - float((picked * mask).sum()), n + float(mask.sum())
    np.testing.assert_allclose(models["proxy (before align)"]["heldout_nll"], nll / n, rtol=1e-4)
    from proxykd_jax.models.tokenizer import load_tokenizer

    tok = load_tokenizer(prepared.root / "tokenizer")
    prompts = metrics_lib.heldout_prompts(prepared, cfg.data, "heldout", 8)
    _, student = hf.load_hf(RunPaths.from_config(cfg).student("student") / "final")
    answers = metrics_lib.sample_answers(student, prompts, tok, tok.eos_token_id, max_new_tokens=16, seed=0)
    assert student.cfg.vocab_size == STUDENT and max(max(a) for a in answers if a) < TOKENS


def test_serving_a_padded_model_never_answers_with_its_extra_ids(run):
    """`serve` of the 320-row proxy (its extra rows larger than the others, so that an unmasked padded id
    would often be drawn and lead the top-k): tokens and top log-probs name only the tokenizer's 270 ids."""
    from proxykd_jax.models.tokenizer import load_tokenizer
    from proxykd_jax.teacher.backends import LlamaBackend

    cfg, _ = run
    _, model = hf.load_hf(pathlib.Path(cfg.proxy.init_from))
    tok = load_tokenizer(cfg.proxy.init_from)
    assert len(tok) == TOKENS and model.cfg.vocab_size == PROXY
    backend = LlamaBackend(model, tok, model_name="proxy")
    prompts = [backend.encode("w1 w2 w3"), backend.encode("w4")]
    rows = backend.complete(
        prompts, n=4, temperature=2.0, top_p=1.0, max_tokens=16, logprobs=True, top_logprobs=20, seeds=[1, 2]
    )
    completions = [c for row in rows for c in row]
    assert sum(len(c.token_ids) for c in completions) > 16
    for c in completions:
        assert max(c.token_ids) < TOKENS
        assert all(i < TOKENS for alternatives in c.top for i, _ in alternatives)
        assert len(c.top[0]) == 20


def test_eval_refuses_rows_past_a_models_context_before_writing(run, tmp_path):
    """eval, like distill and posterior, refuses prepared rows (data.seq_len) longer than a model's max_seq_len
    before it writes anything (it scored them, at positions the model never saw)."""
    cfg, _ = run
    short = tmp_path / "proxy_short"
    shutil.copytree(cfg.proxy.init_from, short)
    config = json.loads((short / "config.json").read_text())
    config["max_position_embeddings"] = int(cfg.data.seq_len) - 1
    (short / "config.json").write_text(json.dumps(config))
    cfg = cfg.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.proxy.init_from, cfg.run.overwrite = str(short), True
    eval_dir = pathlib.Path(cfg.run.dir) / "eval"
    before = sorted(p.name for p in eval_dir.iterdir()) if eval_dir.exists() else None
    with pytest.raises(ConfigError, match=rf"config\.data\.seq_len={cfg.data.seq_len} exceeds the max_seq_len"):
        run_stage("eval", cfg)
    assert (sorted(p.name for p in eval_dir.iterdir()) if eval_dir.exists() else None) == before
