"""distill's validation on a tiny run with a held-out split: with train.eval_every the student's NLL on
distill.eval_split is logged at the evaluated steps and equals a float64 NLL of that step's checkpoint (its
embedding padded past the tokenizer's ids, scored over the tokenizer's as the eval stage scores); with
distill.keep_best final/ is the student of the evaluated step of the lowest eval loss, an interrupted run resumes
to the same one, keep_best without eval_every is refused before any work, and the new fields are recorded."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file
from stage_helpers import interrupted_distill, run_stage, synthetic_store
from test_distill_stage import BATCH, WORDS, K, final_params, make_config, read_metrics

from proxykd_jax import context, data
from proxykd_jax.errors import ConfigError, ProxyKDError
from proxykd_jax.models.tokenizer import build_word_tokenizer

SPLIT = dict(warmup=0.0, align=0.0, distill=0.7, heldout=0.3)
TOKENS = 64  # the word tokenizer's ids (4 specials + 60 words)
STEPS, EVERY = 8, 2


def config(run_dir, **overrides):
    """make_config with a held-out split, the student's embedding padded to 72 rows, and settings under which the
    held-out NLL falls, then rises (the student overfits its 42 samples): its lowest is at an inner step."""
    from proxykd_jax.train.export import default_config

    settings = {"train.steps": STEPS, "train.eval_every": EVERY, "train.keep_checkpoints": 10, "model.vocab_size": 72}
    cfg = make_config(run_dir, **{**settings, "optim.lr": 3e-2, "distill.keep_best": True, **overrides})
    cfg.data.split.update(SPLIT)
    cfg.distill.loss.alpha = 1.0
    cfg.export = default_config()
    return cfg


def build(root):
    """corpus -> prepared/ (distill and heldout splits) -> a store of random top-K posteriors for distill."""
    rng = np.random.default_rng(0)
    run, corpus = root / "run", root / "corpus.jsonl"
    with corpus.open("w") as f:
        for i in range(60):
            prompt = " ".join(rng.choice(WORDS, rng.integers(2, 5)))
            response = " ".join(rng.choice(WORDS, rng.integers(3, 9)))
            f.write(json.dumps({"id": f"p{i}", "prompt": prompt, "response": response}) + "\n")
    tokenizer = build_word_tokenizer(WORDS, run / "prepared_tokenizer")
    data_cfg = config(run).data
    data.prepare([corpus], tokenizer, run / "prepared", data_cfg, progress=False)
    tokenizer.save_pretrained(run / "prepared" / "tokenizer")
    synthetic_store(run, K, TOKENS, rng)
    assert data.PreparedData(run / "prepared").num_samples("heldout") > BATCH  # two eval batches, the last padded
    return run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = build(tmp_path_factory.mktemp("distill_validation"))
    return run, run_stage("distill", config(run))


def evaluated(out) -> dict:
    return {r["step"]: r for r in read_metrics(out) if "eval_loss" in r}


def checkpoint(run, step, out="student"):
    from proxykd_jax.stages import export

    with context.create(config(run), "export", lock=False) as ctx:
        return export.load(ctx, step, run / out)[1]


def reference(model, run) -> tuple[float, float, int]:
    """(NLL per token, NLL per byte, tokens) of the held-out responses: every record padded into one batch, the
    model's float32 logits over the tokenizer's ids, log-softmax in float64."""
    from proxykd_jax.models.tokenizer import load_tokenizer

    records = list(data.PreparedData(run / "prepared").iter_split("heldout"))
    width = max(len(r["tokens"]) for r in records) - 1
    tokens, targets, segments = (np.zeros((len(records), width), np.int32) for _ in range(3))
    mask = np.zeros((len(records), width))
    for i, r in enumerate(records):
        n = len(r["tokens"]) - 1
        tokens[i, :n], targets[i, :n], segments[i, :n] = r["tokens"][:-1], r["tokens"][1:], 1
        mask[i, :n] = r["loss_mask"][1:]
    positions = np.broadcast_to(np.arange(width, dtype=np.int32), tokens.shape)
    logits = np.asarray(model(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments)), np.float64)
    logits = logits[..., :TOKENS]
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    nll = -float((np.take_along_axis(logp, targets[..., None], -1)[..., 0] * mask).sum())
    tok = load_tokenizer(run / "prepared" / "tokenizer")
    nbytes = sum(len(tok.decode(t[m > 0].tolist(), skip_special_tokens=True).encode()) for t, m in zip(targets, mask))
    return nll / mask.sum(), nll / nbytes, int(mask.sum())


def test_eval_rows_at_the_evaluated_steps_equal_a_float64_nll_of_their_checkpoints(trained):
    run, _ = trained
    rows, evals = read_metrics(run / "student"), evaluated(run / "student")
    assert sorted(evals) == list(range(EVERY, STEPS + 1, EVERY))
    assert sorted({r["step"] for r in rows if "loss" in r}) == list(range(1, STEPS + 1))  # the train rows as before
    for step, row in evals.items():
        nll, per_byte, tokens = reference(checkpoint(run, step), run)
        assert row["eval_tokens"] == tokens
        np.testing.assert_allclose(row["eval_loss"], nll, rtol=2e-5, err_msg=f"step {step}")
        np.testing.assert_allclose(row["eval_nats_per_byte"], per_byte, rtol=2e-5, err_msg=f"step {step}")


def test_keep_best_writes_the_student_of_the_lowest_eval_loss(trained, tmp_path):
    from proxykd_jax.context.records import read_record
    from proxykd_jax.models import hf

    run, summary = trained
    losses = {step: row["eval_loss"] for step, row in evaluated(run / "student").items()}
    best = min(losses, key=lambda s: (losses[s], s))
    assert best != STEPS  # the student overfits: the last step is not the best one
    assert (summary["best_step"], summary["best_eval_nll"]) == (best, losses[best])
    assert read_record(run / "student")["summary"] == summary
    final = final_params(run / "student")
    for step in (best, STEPS):
        model = checkpoint(run, step)
        hf.save_hf(model, model.cfg, tmp_path / str(step))
        saved = load_file(str(tmp_path / str(step) / "model.safetensors"))
        same = all(np.array_equal(final[name], saved[name]) for name in saved)
        assert same == (step == best), step
    kept = run / "student" / "best"
    assert [p.name for p in kept.iterdir()] == [str(best)]  # the older ones removed at the end
    assert json.loads((kept / str(best) / "best.json").read_text())["step"] == best


def test_an_interrupted_run_resumes_to_the_same_best(trained):
    """Stopped after step 7 (its newest checkpoint step 4, evaluated up to step 6), then run again: it resumes from
    step 4 and ends with the uninterrupted run's best. A kept folder past step 4 (a killed run's, planted here with a
    better eval loss) is dropped: its step is trained and evaluated again."""
    run, summary = trained
    cfg = config(run, **{"distill.output": "student_cut", "train.checkpoint_every": 4})
    out = run / "student_cut"
    interrupted_distill(cfg, 7)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["4"] and not (out / "final").exists()
    kept = sorted(int(p.name) for p in (out / "best").iterdir())
    assert kept and max(kept) <= 6
    planted = out / "best" / "6"
    if not planted.exists():
        shutil.copytree(out / "best" / str(max(kept)), planted)
    (planted / "best.json").write_text(json.dumps({"step": 6, "eval_loss": 0.0}))
    (out / "best" / "8.tmp").mkdir()  # a folder a killed run was writing

    resumed = run_stage("distill", cfg)
    assert (resumed["best_step"], resumed["best_eval_nll"]) == pytest.approx(
        (summary["best_step"], summary["best_eval_nll"])
    )
    ours, theirs = final_params(out), final_params(run / "student")
    for name in theirs:
        np.testing.assert_allclose(ours[name], theirs[name], atol=1e-6, err_msg=name)
    assert [p.name for p in (out / "best").iterdir()] == [str(summary["best_step"])]
    losses = {s: r["eval_loss"] for s, r in evaluated(out).items()}
    assert losses == pytest.approx({s: r["eval_loss"] for s, r in evaluated(run / "student").items()})


def test_keep_best_without_an_evaluated_step_is_refused_before_any_work(trained):
    run, _ = trained
    for overrides in ({"train.eval_every": 0}, {"train.eval_every": STEPS + 2}):
        cfg = config(run, **{"distill.output": "student_refused", **overrides})
        with pytest.raises(ConfigError, match=r"distill.keep_best=True .*train.eval_every"):
            run_stage("distill", cfg)
    cfg = config(run, **{"distill.output": "student_refused", "distill.eval_split": "align"})
    with pytest.raises(ProxyKDError, match="split 'align' has no samples to score the student"):
        run_stage("distill", cfg)
    assert not (run / "student_refused").exists()


def test_the_settings_are_recorded_and_older_records_still_match(trained, tmp_path):
    """keep_best, eval_split and train.eval_every are distill's settings: a finished student made with others is
    refused naming the field. At their defaults they are left out of every record (records made before them still
    match); the report, which recorded train.eval_every, takes it as its record has it."""
    from proxykd_jax import config as config_lib
    from proxykd_jax.context import artifacts
    from proxykd_jax.context.records import read_record, record_path

    run, _ = trained
    for key, value in (("distill.keep_best", False), ("distill.eval_split", "distill"), ("train.eval_every", 4)):
        with pytest.raises(ProxyKDError, match=rf"{key} .*run.overwrite=True"):
            run_stage("distill", config(run, **{key: value}))
    cfg = config_lib.base_config()
    cfg.run.dir = str(tmp_path / "run")
    for name, spec in artifacts.ARTIFACTS.items():
        fields = artifacts.depends_on(cfg, spec)
        assert not {"distill.keep_best", "distill.eval_split", "train.eval_every"} & set(fields), name
    paths = context.RunPaths.from_config(cfg)
    art = artifacts.open_artifact("report", cfg, paths, overwrite=False)
    art.begin()
    rec = read_record(art.path, False)  # as the version before wrote it: with train.eval_every
    rec["fields"]["train.eval_every"] = 0
    rec["hash"] = artifacts._hash(rec["fields"], rec["inputs"], rec["files"], rec["models"])
    record_path(art.path, False).write_text(json.dumps(rec))
    assert artifacts.open_artifact("report", cfg, paths, overwrite=False).status == "resume"
