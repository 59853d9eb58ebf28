"""A teacher with its own tokenizer end to end: a character-level known teacher served over HTTP,
collected with top log-probs, prepared for a byte-level BPE student (first-byte rule), prior and
posterior. Coverage >= 95% of our positions; the head equals the teacher's true first-byte
distribution; the stored posterior matches the dense I-projection."""

from __future__ import annotations

import json

import numpy as np
import pytest

from proxykd_jax.context import RunPaths
from proxykd_jax.data import byte_head
from proxykd_jax.data.prepare import prepare
from proxykd_jax.data.records import PreparedData
from proxykd_jax.data.store import StoreReader
from proxykd_jax.eval import per_byte
from proxykd_jax.models.tokenizer import load_tokenizer
from tests.pipeline_fixtures import tiny_config
from tests.stage_helpers import run_stage

CHARS = 36  # teacher vocabulary: 4 specials + 32 characters (é ü ß ø among them: two UTF-8 bytes)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from proxykd_jax.teacher.backends import LlamaBackend
    from proxykd_jax.teacher.listen import ServerThread
    from proxykd_jax.teacher.server import make_app

    root = tmp_path_factory.mktemp("xtok")
    cfg = tiny_config(root / "run")
    with cfg.unlocked():
        cfg.proxy.vocab_size = cfg.model.vocab_size = 288
        cfg.data.seq_len = cfg.train.seq_len = 60
        cfg.proxy.max_seq_len = cfg.model.max_seq_len = 96
    teacher = per_byte.char_teacher(
        5, root / "teacher", vocab_size=CHARS, d_model=32, num_layers=1, proxy_cfg=cfg.proxy, eos_rate=0.06
    )
    tok = per_byte.bpe_from_teacher(teacher, root / "bpe", 288, texts=96)
    per_byte.random_proxy(tok, cfg.proxy, root / "proxy_init", seed=1)
    prompts = teacher.make_prompts(24, np.random.default_rng(0), min_words=2, max_words=4)
    (root / "prompts.jsonl").write_text(
        "".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(prompts))
    )
    with cfg.unlocked():
        cfg.collect.prompts = str(root / "prompts.jsonl")
        cfg.collect.model, cfg.collect.api = "char-teacher", "completions"
        cfg.collect.samples_per_prompt, cfg.collect.max_tokens, cfg.collect.top_logprobs = 3, 20, 20
        cfg.collect.concurrency, cfg.collect.progress = 1, False
        cfg.data.tokenizer = cfg.proxy.init_from = cfg.posterior.proxy = str(root / "proxy_init")
    backend = LlamaBackend(teacher.model, teacher.tokenizer, model_name="char-teacher", seed=0)
    with ServerThread(make_app(backend), host="127.0.0.1", port=0) as server:
        with cfg.unlocked():
            cfg.collect.base_url = server.base_url
        run_stage("collect", cfg)
    manifest = run_stage("prepare", cfg)
    return cfg, teacher, load_tokenizer(root / "proxy_init"), manifest, root


def test_char_teacher_head_covers_our_positions(run):
    cfg, teacher, tok, manifest, root = run
    assert manifest["teacher_head"] == "bytes" and manifest["teacher_head_decision"]["source"] == "auto"
    assert manifest["teacher_head_decision"]["span_position_fraction"] < 0.9
    t = manifest["teacher_logprobs"]
    assert t["student_position_fraction"] >= 0.95, t
    assert t["head_mass_fraction"] >= 0.999, t  # every alternative has a first byte
    # Today's span rule on the same corpus keeps only our one-character tokens.
    corpus = RunPaths.from_config(cfg).root / "corpus" / "teacher.jsonl"
    span = prepare([corpus], tok, root / "span", _data(cfg, "exact"), progress=False)
    assert span["teacher_logprobs"]["student_position_fraction"] < t["student_position_fraction"] - 0.2


def _data(cfg, head):
    d = cfg.data.copy_and_resolve_references()
    d.teacher_head = head
    return d


def test_head_is_the_teachers_first_byte_distribution(run):
    cfg, teacher, tok, manifest, _ = run
    prepared = PreparedData(RunPaths.from_config(cfg).prepared)
    recs = [r for s in ("distill", "align") for r in prepared.iter_split(s)][:12]
    rows = [json.loads(x) for x in (RunPaths.from_config(cfg).root / "corpus" / "teacher.jsonl").open()]
    by_key = {(r["id"], r.get("sample_index", 0)): r for r in rows}
    cases = []  # (teacher context, stored symbols, stored log masses)
    for rec in recs:
        row = by_key[(rec["record_id"], rec["response_index"])]
        text, prompt = row["response"], row["prompt"]
        p = int(rec["prompt_len"])
        resp_ids = rec["tokens"][p:-1].tolist()
        starts = np.cumsum([0] + [len(byte_head.token_bytes(tok)[i]) for i in resp_ids])[:-1]
        raw = text.encode()
        for j, start in enumerate(starts):
            lp = rec["teacher_topk_logprobs"][p + j]
            if np.isfinite(lp).any():  # a teacher boundary is a character boundary
                ctx = teacher.encode(prompt) + teacher.encode(raw[:start].decode())
                cases.append((ctx, rec["teacher_topk_ids"][p + j], lp))
    dists = teacher.distributions([c for c, _, _ in cases])  # one call: one compilation
    pieces = [teacher.tokenizer.decode([i], skip_special_tokens=False) for i in range(dists.shape[-1])]
    for (ctx, syms, lp), dist in zip(cases, dists):
        dist = dist[len(ctx) - 1].astype(np.float64)
        want = np.zeros(byte_head.N_SYMBOLS)
        for i in np.argsort(-dist)[:20]:
            want[byte_head.teacher_symbol(pieces[i])] += dist[i]
        got = np.zeros(byte_head.N_SYMBOLS)
        ok = np.isfinite(lp)
        np.add.at(got, syms[ok], np.exp(lp[ok].astype(np.float64)))
        np.testing.assert_allclose(got, want, atol=2e-5)
    checked = len(cases)
    assert checked > 20


def test_posterior_store_is_the_projection(run):
    cfg, teacher, tok, manifest, _ = run
    run_stage("prior", cfg)
    est = run_stage("posterior", cfg)
    paths = RunPaths.from_config(cfg)
    prepared = PreparedData(paths.prepared)
    store = StoreReader(paths.posterior, tokenizer_hash=prepared.tokenizer_hash)
    sym = prepared.head_symbols()
    assert sym is not None and est["k"] == cfg.data.store.k
    moved = 0
    for rec in list(prepared.iter_split("distill"))[:10]:
        entry = store.get(int(rec["sample_id"]))
        p = int(rec["prompt_len"])
        probs = np.exp(entry.logprobs_TxK.astype(np.float64))
        np.testing.assert_allclose(probs.sum(1) + entry.tail_T, 1.0, atol=2e-2)
        for j in range(len(entry.tail_T) - 1):
            lp = rec["teacher_topk_logprobs"][p + j]
            ok = np.isfinite(lp)
            if not ok.any():
                continue
            # Every symbol the teacher gave mass >= 0.2 holds at least that mass (minus what the
            # top-k leaves in the tail) in the stored posterior's tokens of that symbol.
            for s_, x in zip(rec["teacher_topk_ids"][p + j][ok], np.exp(lp[ok].astype(np.float64))):
                if x >= 0.2:
                    group = probs[j][sym[entry.ids_TxK[j]] == s_].sum()
                    assert group + entry.tail_T[j] >= x - 0.03, (group, x)
                    moved += 1
    assert moved > 10


def test_pass_one_runs_the_proxy_once_per_batch(run, monkeypatch):
    """With a bytes head, pass 1 takes the targets' log-probabilities and the first-byte group masses of the
    held-out samples from one forward pass (it ran the proxy twice per batch), and fits what the stage did."""
    import jax

    from proxykd_jax import parallel
    from proxykd_jax.bayes import estimate
    from proxykd_jax.bayes.tables import built_with, load_prior
    from proxykd_jax.models import hf

    cfg = run[0]
    run_stage("prior", cfg)
    stage = run_stage("posterior", cfg)
    paths = RunPaths.from_config(cfg)
    prepared, tables = PreparedData(paths.prepared), load_prior(paths.prior)
    mesh = parallel.make_mesh(cfg.mesh)
    _, model = hf.load_hf(stage["proxy"], mesh=mesh, rules=parallel.LOGICAL_RULES)
    forwards = []
    logits = estimate.token_logits
    jax.clear_caches()  # the stage traced pass 1's functions already: count the traces of a fresh pass
    monkeypatch.setattr(estimate, "token_logits", lambda *a, **k: forwards.append(1) or logits(*a, **k))
    est = estimate.fit_estimate(
        prepared,
        model,
        cfg.posterior,
        built_with(tables, cfg.prior),
        cfg.data,
        mesh=mesh,
        rules=parallel.LOGICAL_RULES,
        seq_len=cfg.data.seq_len,
        batch_size=cfg.posterior.batch_size,
    )
    # traced once per row length the batches are cut to: one jitted forward serves every batch of that shape
    shapes = {
        b["tokens"].shape
        for b in estimate.batches(prepared, cfg.data, seq_len=cfg.data.seq_len, batch_size=cfg.posterior.batch_size)
    }
    assert len(forwards) == len(shapes) >= 1, (forwards, shapes)
    assert est["heldout_tokens"] == stage["heldout_tokens"] > 0
    for key in ("kappa", "n_max", "mu", "gamma"):
        np.testing.assert_allclose(est[key], stage[key], rtol=1e-4, err_msg=key)
