"""A teacher that tokenises like us: `auto` keeps the span rule, and the kernel's token-head path gives
the same numbers as before the first-byte rule existed (the kernel of commit a9705f2, to 1e-6)."""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess

import jax
import numpy as np
import pytest
from test_bayes_posterior import K, N, V, random_case

from proxykd_jax.bayes import posterior_topk
from proxykd_jax.context import RunPaths
from proxykd_jax.data.records import PreparedData
from tests.pipeline_fixtures import build_run

BEFORE = "a9705f251fcf893f0021cdbc6daf183f696aaa58"  # main before teachers with their own tokenizer
REPO = pathlib.Path(__file__).resolve().parent.parent


def _kernel_before(tmp_path):
    try:
        src = subprocess.run(
            ["git", "show", f"{BEFORE}:proxykd_jax/bayes/posterior.py"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"this checkout has no git history with commit {BEFORE[:7]}")
    path = tmp_path / "posterior_before.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("posterior_before", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("mode", ["expected", "geometric"])
def test_token_head_kernel_unchanged(tmp_path, mode):
    before = _kernel_before(tmp_path)
    logits, prior, base, n_pseudo = random_case(21)
    rng = np.random.default_rng(4)
    head = np.stack([rng.choice(V, 5, replace=False) for _ in range(N)]).astype(np.int32)
    lp = np.log(rng.dirichlet(np.ones(8), N)[:, :5]).astype(np.float32)
    lp[::4] = -np.inf
    kw = dict(k=K, mode=mode, beta=0.7, head_ids_NxH=head, head_logprobs_NxH=lp, chunk=7)
    now = jax.jit(lambda *a: posterior_topk(*a, **kw))(logits, prior, base, n_pseudo, 2.0)
    old = jax.jit(lambda *a: before.posterior_topk(*a, **kw))(logits, prior, base, n_pseudo, 2.0)
    np.testing.assert_array_equal(np.asarray(now[0]), np.asarray(old[0]))
    np.testing.assert_allclose(np.asarray(now[1]), np.asarray(old[1]), atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(now[2]), np.asarray(old[2]), atol=1e-6, rtol=0)


def test_auto_keeps_the_span_rule_for_the_same_tokenizer(tmp_path):
    cfg, _ = build_run(tmp_path / "run", top_logprobs=5)
    prepared = PreparedData(RunPaths.from_config(cfg).prepared)
    m = prepared.manifest
    assert m["teacher_head"] == "exact" and prepared.head_symbols() is None
    assert m["teacher_head_decision"]["span_position_fraction"] >= 0.99
    assert m["teacher_logprobs"]["student_position_fraction"] >= 0.99
