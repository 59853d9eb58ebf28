"""The report's estimates.json follows the aligned proxies that exist (a later report run that adds a
variant needing another alignment refreshes it), and the alignment plot takes seeds whose estimates
cover different alignments."""

from __future__ import annotations

import json
import types

import matplotlib.image
import numpy as np

from proxykd_jax.data import records, store
from proxykd_jax.eval import metrics as metrics_lib
from proxykd_jax.report import plots
from proxykd_jax.report.runner import SeedRun


def _seed_run(tmp_path, monkeypatch) -> tuple[SeedRun, list]:
    """A SeedRun whose stages and metrics are stand-ins: `calls` gets the proxy folders each estimate scored."""
    calls = []
    seed = tmp_path / "perturbed" / "seed0"
    (seed / "p_full_eb" / "posterior").mkdir(parents=True)
    (seed / "p_full_eb" / "posterior" / "estimate.json").write_text(json.dumps({"kappa": 1.0, "n_max": 2.0}))
    ctx = types.SimpleNamespace(
        paths=types.SimpleNamespace(posterior=seed / "p_full_eb" / "posterior", prepared=seed, prior=seed),
        cfg=types.SimpleNamespace(
            data=None,
            eval=types.SimpleNamespace(batch_size=2, max_samples=2),
            proxy=types.SimpleNamespace(dtype="float32", param_dtype="float32"),
        ),
        mesh=None,
        rules=None,
        load_model=lambda folder, **kw: (None, folder),
        write_json=lambda path, obj: (path.parent.mkdir(parents=True, exist_ok=True), path.write_text(json.dumps(obj))),
    )
    run = object.__new__(SeedRun)
    run.runner = types.SimpleNamespace(ctx=ctx)
    run.setting, run.seed, run.folder, run.dir, run.teacher = "perturbed", 0, tmp_path / "perturbed", seed, None
    run.spec = types.SimpleNamespace(same_tokenizer=True)
    run.results = tmp_path / "report" / "results" / "perturbed" / "seed0"
    run.posterior = lambda align, post: (ctx, {})
    run.proxy = lambda align: (seed / f"a_{align}" / "proxy" / "final", {"init": {"kl_to_teacher": 1.0}})
    monkeypatch.setattr(records, "PreparedData", lambda root: types.SimpleNamespace(tokenizer_hash="h"))
    monkeypatch.setattr(store, "StoreReader", lambda *a, **k: None)
    monkeypatch.setattr("proxykd_jax.bayes.tables.load_prior", lambda path: None)
    monkeypatch.setattr(metrics_lib, "eval_batches", lambda *a, **k: [])
    monkeypatch.setattr(metrics_lib, "Scorer", lambda *a: None)
    reference = {"one-hot (smoothed)": 0.3, "prior": 0.2, "posterior (store)": 0.1, "positions": 5}
    monkeypatch.setattr(metrics_lib, "reference_estimator_kl", lambda *a: calls.append([]) or reference)
    monkeypatch.setattr(  # (the stand-in model is its folder)
        metrics_lib, "proxy_estimator_kl", lambda m, *a: calls[-1].append(m) or {"kl": 0.1, "positions": 5}
    )
    return run, calls


def _align(run, name):
    final = run.dir / f"a_{name}" / "proxy" / "final"
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")


def test_estimates_are_recomputed_when_another_alignment_appears(tmp_path, monkeypatch):
    run, calls = _seed_run(tmp_path, monkeypatch)
    _align(run, "full")
    first = run.estimates()
    assert set(first["phases"]) == {"full"} and len(calls) == 1
    assert run.estimates() == first and len(calls) == 1  # nothing new: reused
    _align(run, "sft")  # a later report run added a variant aligned by SFT only
    second = run.estimates()
    assert set(second["phases"]) == {"full", "sft"} and "proxy (sft)" in second["estimator_kl"] and len(calls) == 2
    assert len(calls[-1]) == 3 and second["estimator_kl"]["positions"] == 5  # init, full, sft: one at a time
    assert json.loads((run.results / "estimates.json").read_text()) == second
    assert run.estimates() == second and len(calls) == 2


def test_alignment_plot_takes_seeds_with_different_alignments(tmp_path):
    eb = {"kappa": 1.0, "n_max": 2.0, "heldout_loglik": {}, "eb_search": []}
    estimates = [
        {
            "setting": "perturbed",
            "seed": 0,
            "estimator_kl": {},
            "phases": {"full": {"init": 1.3, "sft": 1.2}},
            "eb": eb,
        },
        {
            "setting": "perturbed",
            "seed": 1,
            "estimator_kl": {},
            "phases": {"full": {"init": 1.3, "sft": 1.2, "round_000": 1.1}, "sft": {"init": 1.3, "sft": 1.25}},
            "eb": eb,
        },
    ]
    pngs = plots.write_plots(tmp_path, [], estimates)
    assert [p.name for p in pngs] == ["alignment.png"]
    assert matplotlib.image.imread(tmp_path / "alignment.png").shape[0] > 100


def test_alignment_error_bars_are_the_sample_std_of_the_tables(tmp_path, monkeypatch):
    """The alignment plot's error bars are the sample std over seeds (ddof 1, as every table's ±; they were
    the population std, 18% smaller at three seeds), and 0 where one seed ran a phase."""
    import matplotlib.axes

    rng = np.random.default_rng(4)
    kls = rng.uniform(0.8, 1.6, (3, 3))
    names = ("init", "sft", "round_000")
    estimates = [
        {
            "setting": "perturbed",
            "seed": s,
            "estimator_kl": {},
            "phases": {"full": {p: float(kls[s, i]) for i, p in enumerate(names) if s == 0 or p != "round_000"}},
            "eb": {"kappa": 1.0, "n_max": 2.0, "heldout_loglik": {}, "eb_search": []},
        }
        for s in range(3)
    ]
    drawn = []
    errorbar = matplotlib.axes.Axes.errorbar
    monkeypatch.setattr(
        matplotlib.axes.Axes,
        "errorbar",
        lambda self, x, y, **kw: drawn.append(kw["yerr"]) or errorbar(self, x, y, **kw),
    )
    plots.write_plots(tmp_path, [], estimates)
    want = [np.std(kls[:, 0], ddof=1), np.std(kls[:, 1], ddof=1), 0.0]  # round_000: seed 0 only
    np.testing.assert_allclose(drawn[0], want, rtol=1e-12)


def test_a_scored_student_is_released_when_score_returns(tmp_path, monkeypatch):
    """`SeedRun.score` loads a variant's student in the model group's dtypes and releases it before it returns,
    as the eval stage does (`metrics.scored_alone`): a module graph holds reference cycles, so without a
    collection the student stays on the device into the next variant's distill."""
    import gc
    import weakref

    import jax
    from flax import nnx

    from proxykd_jax.models.llama import Llama, ModelConfig
    from proxykd_jax.report import metrics as report_metrics

    run, _ = _seed_run(tmp_path, monkeypatch)
    student = ModelConfig(
        vocab_size=64, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, d_ff=32, max_seq_len=8
    )
    loaded, refs = [], []

    def load_model(folder, **kw):
        loaded.append(kw)
        model = Llama(student, rngs=nnx.Rngs(int(np.random.default_rng().integers(1 << 30))))
        refs.extend(weakref.ref(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        return student, model

    group = types.SimpleNamespace(dtype="bfloat16", param_dtype="float32")
    held = types.SimpleNamespace(split="heldout", batch_size=2, max_samples=2, generate_prompts=1, max_new_tokens=4)
    ctx = types.SimpleNamespace(**vars(run.runner.ctx))
    ctx.load_model, ctx.cfg = load_model, types.SimpleNamespace(**vars(ctx.cfg) | {"model": group, "eval": held})
    monkeypatch.setattr(metrics_lib, "heldout_prompts", lambda *a: [])
    monkeypatch.setattr(report_metrics, "heldout_scores", lambda model, *a: {"nats_per_byte": 1.5})
    monkeypatch.setattr(report_metrics, "generation_score", lambda model, *a, **k: -2.0)
    gc.disable()  # a student kept only by reference cycles is freed by `score`, not by chance
    try:
        out = run.score(ctx, tmp_path / "student" / "final")
        alive = sum(r() is not None for r in refs)
    finally:
        gc.enable()
    assert out == {"nats_per_byte": 1.5, "teacher_loglik_per_byte": -2.0}
    assert loaded == [{"dtype": "bfloat16", "param_dtype": "float32", "group": group}] and refs
    assert alive == 0
