"""The distill stage end to end on a tiny run directory: KD, the α = 0 baseline, white-box mode and
the overwrite rule. Also the fixtures (config, run directory) of test_distill_resume.py / test_export.py."""

import dataclasses
import json
import pathlib

import ml_collections
import numpy as np
import pytest
from safetensors.numpy import load_file
from stage_helpers import run_stage

from proxykd_jax import data
from proxykd_jax.errors import ProxyKDError
from proxykd_jax.models.tokenizer import build_word_tokenizer

WORDS = [f"w{i}" for i in range(60)]
SEQ, BATCH, K = 32, 8, 8


def make_config(run_dir, **overrides) -> ml_collections.ConfigDict:
    """The groups the distill stage reads, with tiny shapes (no configs/ file needed)."""
    from proxykd_jax import config as config_lib
    from proxykd_jax import context
    from proxykd_jax.parallel import mesh
    from proxykd_jax.train import distill, loop, optim

    cfg = ml_collections.ConfigDict()
    cfg.run = context.run_config()
    cfg.run.dir = str(run_dir)
    cfg.mesh = mesh.default_config()
    cfg.model = config_lib.model_group()
    cfg.model.update(
        vocab_size=64, d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, d_ff=48, max_seq_len=SEQ
    )
    cfg.data = data.default_config()
    cfg.data.update(seq_len=SEQ, batch_size=BATCH, num_epochs=0)
    cfg.data.split.update(warmup=0.0, align=0.0, distill=1.0, heldout=0.0)
    cfg.optim = optim.default_config()
    cfg.optim.update(lr=3e-3, warmup_steps=1)
    cfg.train = loop.default_config()
    cfg.train.update(
        steps=6,
        batch_size=BATCH,
        seq_len=SEQ,
        checkpoint_every=2,
        log_every=1,
        tensorboard=False,
        progress=False,
        peak_flops=1e9,
    )
    cfg.distill = distill.default_config()
    cfg.distill.loss.chunk_size = 64
    for key, value in overrides.items():
        group, field = key.split(".", 1)
        cfg[group][field] = value
    return cfg


def build_run(root: pathlib.Path, n_samples: int = 40, seed: int = 0) -> pathlib.Path:
    """corpus -> prepared/ (+ tokenizer) -> a posterior store of random top-K distributions."""
    rng = np.random.default_rng(seed)
    run = root / "run"
    corpus = root / "corpus.jsonl"
    with corpus.open("w") as f:
        for i in range(n_samples):
            prompt = " ".join(rng.choice(WORDS, rng.integers(2, 5)))
            response = " ".join(rng.choice(WORDS, rng.integers(3, 9)))
            f.write(json.dumps({"id": f"p{i}", "prompt": prompt, "response": response}) + "\n")
    tokenizer = build_word_tokenizer(WORDS, run / "prepared_tokenizer")
    cfg = make_config(run)
    data.prepare([corpus], tokenizer, run / "prepared", cfg.data, progress=False)
    tokenizer.save_pretrained(run / "prepared" / "tokenizer")
    prepared = data.PreparedData(run / "prepared")
    with data.StoreWriter(
        run / "posterior",
        k=K,
        vocab_size=cfg.model.vocab_size,
        tokenizer_hash=prepared.tokenizer_hash,
        value_dtype="float32",
        tail_dtype="float32",
    ) as w:
        for rec in prepared.iter_split("distill"):
            t = len(rec["tokens"]) - int(rec["prompt_len"])
            ids = np.stack([rng.permutation(cfg.model.vocab_size)[:K] for _ in range(t)]).astype(np.int32)
            probs = rng.dirichlet(np.full(K + 1, 0.3), size=t)
            w.add(int(rec["sample_id"]), ids, np.log(probs[:, :K]), probs[:, K], weight=rng.uniform(0.2, 1.0))
    return run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return build_run(tmp_path_factory.mktemp("distill"))


def final_params(out: pathlib.Path) -> dict:
    return load_file(str(out / "final" / "model.safetensors"))


def read_metrics(out: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_kd_and_sft_runs_write_students_with_metrics(run_dir):
    from proxykd_jax.train import distill

    run_stage("distill", make_config(run_dir))
    run_stage("distill", make_config(run_dir, **{"distill.loss": dict(distill.default_config().loss, alpha=0.0)}))
    kd, sft = final_params(run_dir / "student"), final_params(run_dir / "student_sft")
    assert set(kd) == set(sft) and (run_dir / "student" / "final" / "tokenizer.json").exists()
    assert any(not np.allclose(kd[n], sft[n]) for n in kd)
    kd_m, sft_m = read_metrics(run_dir / "student"), read_metrics(run_dir / "student_sft")
    assert [m["step"] for m in kd_m] == list(range(1, 7))
    assert all(m["kd"] > 0 and 0 < m["mfu"] and m["tokens_per_s"] > 0 for m in kd_m)
    assert all(m["kd"] == 0.0 for m in sft_m)
    # the KD run's objective is CE + α·KD per token; the SFT run's is CE alone
    assert all(abs(m["loss"] - (m["ce"] + 100.0 * m["kd"])) < 1e-3 * m["loss"] for m in kd_m)
    assert all(abs(m["loss"] - m["ce"]) < 1e-6 for m in sft_m)
    assert [m["tokens"] for m in kd_m] == [m["tokens"] for m in sft_m]  # same batches for both students
    # the same settings again: the finished student is reused, nothing trains
    assert run_stage("distill", make_config(run_dir))["steps"] == 6
    assert read_metrics(run_dir / "student") == kd_m
    # other settings: refused, naming the changed field, until run.overwrite is set
    with pytest.raises(ProxyKDError, match=r"optim.lr 0.003 -> 0.002.*run.overwrite=True"):
        run_stage("distill", make_config(run_dir, **{"optim.lr": 2e-3}))
    assert final_params(run_dir / "student").keys() == kd.keys()


def test_white_box_run_uses_the_live_teacher(run_dir):
    from flax import nnx

    from proxykd_jax import context
    from proxykd_jax.models import hf
    from proxykd_jax.models.llama import Llama, ModelConfig
    from proxykd_jax.stages import distill

    cfg = make_config(run_dir, **{"distill.output": "student_wb", "train.steps": 2})
    teacher_cfg = ModelConfig.from_config(cfg.model)
    hf.save_hf(Llama(teacher_cfg, rngs=nnx.Rngs(7)), teacher_cfg, run_dir / "teacher_hf")
    cfg.distill.white_box = str(run_dir / "teacher_hf")
    with context.create(cfg, "distill") as ctx:
        setup = distill.setup(ctx, ctx.artifact("distill"))
    assert len(setup.frozen) == 1 and not any(k.startswith("kd_") for k in next(iter(setup.data_iter)))
    run_stage("distill", cfg)
    metrics = read_metrics(run_dir / "student_wb")
    assert len(metrics) == 2 and all(m["kd"] > 0 and m["mfu"] > 0 for m in metrics)
    bad = make_config(run_dir, **{"distill.output": "student_wb2", "model.vocab_size": 80})
    bad.distill.white_box = str(run_dir / "teacher_hf")
    with pytest.raises(ProxyKDError, match="vocab_size"):
        run_stage("distill", bad)
    assert not (run_dir / "student_wb2").exists()  # refused before anything was written
    short_cfg = dataclasses.replace(teacher_cfg, max_seq_len=SEQ // 2)  # rows past the teacher's context
    hf.save_hf(Llama(short_cfg, rngs=nnx.Rngs(7)), short_cfg, run_dir / "teacher_short")
    bad = make_config(run_dir, **{"distill.output": "student_wb3"})
    bad.distill.white_box = str(run_dir / "teacher_short")
    with pytest.raises(ProxyKDError, match=f"config.train.seq_len={SEQ} exceeds the max_seq_len {SEQ // 2}"):
        run_stage("distill", bad)
    assert not (run_dir / "student_wb3").exists()


def test_a_diverging_run_stops_before_checkpointing_nan(run_dir):
    from proxykd_jax.train import TrainingDiverged

    cfg = make_config(run_dir, **{"distill.output": "student_nan", "train.steps": 4, "optim.clip_norm": 0.0})
    cfg.optim.lr = 1e30  # lr is 0 for update 1 (warm-up), so step 3 is the first to see the blown-up weights
    with pytest.raises(TrainingDiverged, match="step 3"):
        run_stage("distill", cfg)
    out = run_dir / "student_nan"
    assert not (out / "final").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2"]  # the last good one only


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        (3, r"train.steps=3 is shorter than the optim.grad_accum=4 micro-batches .* never be updated"),
        (
            6,
            r"train.steps=6 is not a multiple of optim.grad_accum=4: its last 2 micro-batches .* set train.steps to 4 or 8",
        ),
    ],
)
def test_steps_that_are_not_whole_accumulated_updates_are_refused(run_dir, steps, message):
    """With optim.grad_accum = 4, 3 steps never updated the student (its final/ was its init) and 6 steps
    trained on 2 micro-batches that were never applied: both are refused before anything is written."""
    from proxykd_jax.errors import ConfigError

    out = f"student_accum_{steps}"
    cfg = make_config(run_dir, **{"train.steps": steps, "optim.grad_accum": 4, "optim.warmup_steps": 0})
    cfg.distill.output = out
    with pytest.raises(ConfigError, match=message):
        run_stage("distill", cfg)
    assert not (run_dir / out).exists()
    cfg.train.steps = 8  # two whole updates: trains
    assert run_stage("distill", cfg)["steps"] == 8


def test_a_student_folder_of_another_context_is_refused(run_dir, tmp_path):
    """A model.init_from folder trained for 16 positions under a group of max_seq_len 32: the student would be
    trained at positions it never saw and saved claiming the group's context. Refused before anything is
    written, naming both values; the matching group trains."""
    from flax import nnx

    from proxykd_jax.models import hf
    from proxykd_jax.models.llama import Llama, ModelConfig

    cfg = make_config(run_dir)
    shape = {k: cfg.model[k] for k in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads")}
    shape.update(head_dim=cfg.model.head_dim, d_ff=cfg.model.d_ff)
    folder = tmp_path / "student16"
    hf.save_hf(
        Llama(ModelConfig(**shape, max_seq_len=16), rngs=nnx.Rngs(0)), ModelConfig(**shape, max_seq_len=16), folder
    )
    cfg.model.init_from = str(folder)
    cfg.distill.output = "student_ctx"
    with pytest.raises(ProxyKDError, match=r"config.json disagrees with config.model on max_seq_len=16 \(config: 32\)"):
        run_stage("distill", cfg)
    assert not (run_dir / "student_ctx").exists()


def _mistral_folder(cfg, folder, window, max_positions):
    """A student folder of the group's shapes labelled as a Mistral with a sliding window."""
    from flax import nnx

    from proxykd_jax.models import hf
    from proxykd_jax.models.llama import Llama, ModelConfig

    shape = {k: cfg.model[k] for k in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads")}
    mc = ModelConfig(**shape, head_dim=cfg.model.head_dim, d_ff=cfg.model.d_ff, max_seq_len=max_positions)
    hf.save_hf(Llama(mc, rngs=nnx.Rngs(0)), mc, folder)
    spec = json.loads((folder / "config.json").read_text())
    spec.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=window)
    (folder / "config.json").write_text(json.dumps(spec))
    return folder


def test_a_mistral_student_is_written_back_as_a_mistral_with_its_window(run_dir, tmp_path):
    """A Mistral student folder (window SEQ, context 4 x SEQ): its group must name the window (a group without it
    is refused with a sentence naming it), and final/ keeps the family, the window and the context (it was
    written as a Llama of max_position_embeddings SEQ before)."""
    cfg = make_config(run_dir, **{"train.steps": 2, "optim.warmup_steps": 0})
    cfg.model.init_from = str(_mistral_folder(cfg, tmp_path / "mistral", SEQ, 4 * SEQ))
    cfg.distill.output = "student_mistral"
    cfg.model.max_seq_len = 4 * SEQ
    with pytest.raises(ProxyKDError, match=f"sliding_window={SEQ} .config: None."):
        run_stage("distill", cfg)
    cfg.model.sliding_window = SEQ
    run_stage("distill", cfg)
    written = json.loads((run_dir / "student_mistral" / "final" / "config.json").read_text())
    assert (written["architectures"], written["model_type"]) == (["MistralForCausalLM"], "mistral")
    assert (written["sliding_window"], written["max_position_embeddings"]) == (SEQ, 4 * SEQ)


@pytest.mark.parametrize("steps", [6, 5])
def test_a_split_too_small_for_the_steps_is_one_sentence(run_dir, steps):
    """One epoch of the 40 samples: 6 steps of 8 rows need 48 rows, more than 40 samples can fill (refused
    before anything is written); 5 steps pass that bound, but the samples pack 2-4 to a row and the data runs
    out during training: one sentence (a ProxyKDError, not a bare ValueError) saying what to change."""
    cfg = make_config(run_dir, **{"train.steps": steps, "data.num_epochs": 1})
    cfg.distill.output = f"student_epoch_{steps}"
    message = "pack into at most 5 batches" if steps == 6 else r"ran out after \d of train.steps=5 steps"
    with pytest.raises(ProxyKDError, match=message) as info:
        run_stage("distill", cfg)
    assert "data.num_epochs=0" in str(info.value)
    assert (run_dir / cfg.distill.output).exists() == (steps == 5)
