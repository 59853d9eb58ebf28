"""The align stage end to end on a tiny run directory: SFT + DPO rounds, frozen reference, final HF
folder, and the same run on an 8-device mesh (fsdp=4, tensor=2) equal to a 1-device run.

The prepared data is built once per module and copied into each run directory.
"""

import json
import pathlib
import re
import shutil

import jax
import ml_collections
import numpy as np
import pytest
from stage_helpers import run_stage

WORDS = [f"w{i}" for i in range(56)]
SEQ = 32


def make_config(run_dir, **align_overrides) -> ml_collections.ConfigDict:
    """A tiny align config: 1-layer proxy, 8 pairs per step, SFT 4 steps, 2 DPO rounds of 3 steps."""
    from proxykd_jax import config as config_lib
    from proxykd_jax import context, data
    from proxykd_jax.align import config as align_config
    from proxykd_jax.parallel import mesh
    from proxykd_jax.train import loop, optim

    cfg = ml_collections.ConfigDict()
    cfg.run = context.run_config()
    cfg.run.dir = str(run_dir)
    cfg.mesh = mesh.default_config()
    cfg.proxy = config_lib.model_group()
    cfg.proxy.update(
        vocab_size=64, d_model=32, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=16, d_ff=48, max_seq_len=SEQ
    )
    cfg.data = data.default_config()
    cfg.data.update(seq_len=SEQ)
    cfg.data.split.update(warmup=0.3, align=0.5, distill=0.0, heldout=0.2)
    cfg.optim = optim.default_config()
    cfg.train = loop.default_config()
    cfg.train.update(log_every=1, tensorboard=False, progress=False, peak_flops=1e9)
    cfg.align = align_config.default_config()
    cfg.align.update(
        batch_size=8,
        sft_steps=4,
        sft_lr=3e-3,
        rounds=2,
        dpo_steps_per_round=3,
        dpo_lr=1e-3,
        max_new_tokens=8,
        sample_batch_size=8,
        logprob_chunk=64,
        eval_batch_size=8,
        checkpoint_every=2,
    )
    cfg.align.update(align_overrides)
    return cfg


def build_prepared(root: pathlib.Path, n: int = 48, seed: int = 0) -> pathlib.Path:
    """Writes a random word corpus and prepares it into <root>/prepared (with its tokenizer)."""
    from proxykd_jax import data
    from proxykd_jax.models.tokenizer import build_word_tokenizer

    rng = np.random.default_rng(seed)
    corpus = root / "corpus.jsonl"
    with corpus.open("w") as f:
        for i in range(n):
            prompt = " ".join(rng.choice(WORDS, rng.integers(2, 5)))
            response = " ".join(rng.choice(WORDS[:12], rng.integers(2, 6)))
            f.write(json.dumps({"id": f"p{i}", "prompt": prompt, "response": response}) + "\n")
    tokenizer = build_word_tokenizer(WORDS, root / "tokenizer_src")
    data.prepare([corpus], tokenizer, root / "prepared", make_config(root).data, progress=False)
    tokenizer.save_pretrained(root / "prepared" / "tokenizer")
    return root / "prepared"


def new_run(prepared: pathlib.Path, run: pathlib.Path) -> pathlib.Path:
    """A fresh run directory holding a copy of the prepared data."""
    run.mkdir(parents=True)
    shutil.copytree(prepared, run / "prepared")
    return run


def final_params(run: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(run / "proxy" / "final" / "model.safetensors"))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return build_prepared(tmp_path_factory.mktemp("align_data"))


@pytest.fixture(scope="module")
def sharded_run(prepared, tmp_path_factory):
    """(run dir, config, summaries) of the align stage on all 8 devices as fsdp=4 x tensor=2."""
    run = new_run(prepared, tmp_path_factory.mktemp("align_sharded") / "run")
    cfg = make_config(run)
    cfg.mesh.shape.update(data=1, fsdp=4, tensor=2)
    assert jax.device_count() == 8
    return run, cfg, run_stage("align", cfg)


def _template(cfg):
    from flax import nnx

    from proxykd_jax.models.llama import Llama, ModelConfig

    return Llama(ModelConfig.from_config(cfg.proxy), rngs=nnx.Rngs(0))


def _leaves(module):
    from flax import nnx

    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(module, nnx.Param))]


def test_align_stage_runs_and_keeps_reference_frozen(sharded_run):
    from proxykd_jax.align import objectives, pairs, phases

    run, cfg, summaries = sharded_run
    out = run / "proxy"
    assert set(summaries) == {"init", "sft", "round_000", "round_001"}
    assert summaries["sft"]["heldout_nll"] < summaries["init"]["heldout_nll"]
    for name in ("sft", "round_000", "round_001"):
        assert phases.is_done(out / name)
        assert summaries[name]["heldout_nll"] > 0
    assert summaries["round_000"]["steps"] == 3 and summaries["round_000"]["pairs"] > 0
    template = _template(cfg)
    sft = phases.restore_params(template, out / "sft" / "params")
    after0 = phases.restore_params(template, out / "round_000" / "params")
    # each round's reference is the policy at the round's start, still intact after the round trained
    for ref_dir, start in (("round_000", sft), ("round_001", after0)):
        ref = phases.restore_params(template, out / ref_dir / "reference")
        for a, b in zip(_leaves(ref), _leaves(start)):
            np.testing.assert_array_equal(a, b)
    assert max(np.abs(a - b).max() for a, b in zip(_leaves(sft), _leaves(after0))) > 0
    # the reference log-probs the round trained against are those of the SFT proxy
    rows, _ = pairs.load_pairs(out / "round_000" / "pairs.npz")
    ref_c, ref_r = objectives.reference_logprobs(sft, (), rows, batch_size=8, chunk=64)
    np.testing.assert_allclose(rows["ref_chosen_logp"], ref_c, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rows["ref_rejected_logp"], ref_r, rtol=1e-5, atol=1e-5)
    assert not np.array_equal(rows["chosen_tokens"], rows["rejected_tokens"])
    assert final_params(run)
    assert run_stage("align", cfg) == summaries  # finished: reused, nothing to redo
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4


def test_sharded_run_equals_single_device(sharded_run, prepared, tmp_path):
    run8, _, summaries8 = sharded_run
    run1 = new_run(prepared, tmp_path / "run")
    cfg = make_config(run1)
    cfg.mesh.shape.update(data=1, fsdp=1, tensor=1)
    summaries1 = run_stage("align", cfg, devices=jax.devices()[:1])
    for name in ("init", "sft", "round_000", "round_001"):
        np.testing.assert_allclose(summaries1[name]["heldout_nll"], summaries8[name]["heldout_nll"], rtol=1e-5)
    for name in ("round_000", "round_001"):
        assert summaries1[name]["pairs"] == summaries8[name]["pairs"]
    p1, p8 = final_params(run1), final_params(run8)
    assert sorted(p1) == sorted(p8)
    for key in p1:
        np.testing.assert_allclose(p1[key], p8[key], rtol=1e-5, atol=1e-5, err_msg=key)


def test_initial_reference_and_ipo(prepared, tmp_path):
    """align.reference = "initial": every round samples from the policy at its start but scores its
    pairs with the post-SFT proxy; loss_type = "ipo" trains through the same rounds."""
    from proxykd_jax.align import objectives, pairs, phases

    run = new_run(prepared, tmp_path / "run")
    cfg = make_config(run, reference="initial", loss_type="ipo")
    cfg.mesh.shape.update(data=1, fsdp=1, tensor=1)
    summaries = run_stage("align", cfg, devices=jax.devices()[:1])
    assert set(summaries) == {"init", "sft", "round_000", "round_001"}
    out = run / "proxy"
    template = _template(cfg)
    sft = phases.restore_params(template, out / "sft" / "params")
    after0 = phases.restore_params(template, out / "round_000" / "params")
    start1 = phases.restore_params(template, out / "round_001" / "reference")
    for a, b in zip(_leaves(start1), _leaves(after0)):  # round 1 sampled from the policy after round 0
        np.testing.assert_array_equal(a, b)
    rows, _ = pairs.load_pairs(out / "round_001" / "pairs.npz")
    ref_c, ref_r = objectives.reference_logprobs(sft, (), rows, batch_size=8, chunk=64)
    np.testing.assert_allclose(rows["ref_chosen_logp"], ref_c, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rows["ref_rejected_logp"], ref_r, rtol=1e-5, atol=1e-5)
    now_c, _ = objectives.reference_logprobs(after0, (), rows, batch_size=8, chunk=64)
    assert np.abs(now_c - ref_c).max() > 1e-3  # the round-start policy would have given other numbers
    assert np.isfinite(summaries["round_001"]["heldout_nll"])


@pytest.mark.parametrize(
    "overrides, field",
    [({"sft_steps": 1}, "align.sft_steps=1"), ({"dpo_steps_per_round": 1}, "align.dpo_steps_per_round=1")],
)
def test_a_phase_shorter_than_grad_accum_is_refused_before_training(prepared, tmp_path, overrides, field):
    """With optim.grad_accum = 2 a 1-step phase would never update the proxy: refused before any phase runs."""
    from proxykd_jax.errors import ConfigError

    run = new_run(prepared, tmp_path / "run")
    cfg = make_config(run, **overrides)
    cfg.optim.grad_accum = 2
    cfg.mesh.shape.update(data=1, fsdp=1, tensor=1)
    with pytest.raises(ConfigError, match=rf"{re.escape(field)}\) is shorter than the optim\.grad_accum=2 micro"):
        run_stage("align", cfg, devices=jax.devices()[:1])
    assert not (run / "proxy" / "sft" / "checkpoints").exists()


def test_phases_of_whole_optimizer_updates(prepared, tmp_path):
    """optim.grad_accum = 2: align.sft_steps = 3 (its last micro-batch computed and never applied) is refused
    before anything is written; a DPO round of one pass over its pairs runs a whole number of updates."""
    from proxykd_jax.errors import ConfigError

    run = new_run(prepared, tmp_path / "run")
    cfg = make_config(run, sft_steps=3, rounds=1)
    cfg.optim.grad_accum = 2
    cfg.mesh.shape.update(data=1, fsdp=1, tensor=1)
    with pytest.raises(
        ConfigError, match=r"align\.sft_steps=3\) is not a multiple of optim\.grad_accum=2: .* to 2 or 4"
    ):
        run_stage("align", cfg, devices=jax.devices()[:1])
    assert not (run / "proxy").exists()  # refused before the artifact was begun: the next run needs no overwrite
    cfg = make_config(run, sft_steps=2, rounds=1, dpo_steps_per_round=0)
    cfg.optim.grad_accum = 2
    cfg.mesh.shape.update(data=1, fsdp=1, tensor=1)
    summaries = run_stage("align", cfg, devices=jax.devices()[:1])
    pairs = summaries["round_000"]["pairs"]
    assert (pairs // 8) % 2 == 1, pairs  # one pass would be an odd number of micro-batches of 8 pairs
    assert summaries["round_000"]["steps"] == pairs // 8 - 1


def test_rows_longer_than_the_proxys_context_are_refused_before_training(prepared, tmp_path):
    """align.seq_len = 48 against a proxy of max_seq_len 32: one sentence before anything is written (it
    trained at positions the proxy never saw, without a word)."""
    from proxykd_jax.errors import ConfigError

    run = new_run(prepared, tmp_path / "run")
    cfg = make_config(run, seq_len=48)
    cfg.mesh.shape.update(data=1, fsdp=1, tensor=1)
    with pytest.raises(ConfigError, match=r"config\.align\.seq_len=48 exceeds the max_seq_len 32 of the proxy; lower"):
        run_stage("align", cfg, devices=jax.devices()[:1])
    assert not (run / "proxy").exists()


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"lora.rank": 2, "lora.targets": ("wq", "attn")}, r"config\.align\.lora\.targets has unknown weight names"),
        ({"lora.rank": 2, "lora.targets": ()}, r"config\.align\.lora\.targets names no weight"),
        ({"seq_len": 4}, r"does not fit rows of align\.seq_len=4 tokens"),
    ],
)
def test_bad_align_settings_stop_with_one_sentence(prepared, tmp_path, overrides, match):
    """Settings no config check reads stop with a ProxyKDError (the CLI's one line, no traceback) naming the field."""
    from proxykd_jax.errors import ProxyKDError

    run = new_run(prepared, tmp_path / "run")
    cfg = make_config(run)
    cfg.mesh.shape.update(data=1, fsdp=1, tensor=1)
    for key, value in overrides.items():
        group, _, field = key.rpartition(".")
        (cfg.align.lora if group else cfg.align)[field] = value
    with pytest.raises(ProxyKDError, match=match):
        run_stage("align", cfg, devices=jax.devices()[:1])
    assert not (run / "proxy" / "sft" / "checkpoints").exists()
