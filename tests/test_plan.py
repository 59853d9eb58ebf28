"""`proxykd plan`: every stage's step lowered and compiled on abstract sharded inputs over 8
simulated devices; memory and FLOPs reported, nothing allocated."""

import logging

import ml_collections
import pytest

from proxykd_jax import cli, compiled_steps, plan
from proxykd_jax.config import base_config
from proxykd_jax.errors import ProxyKDError
from proxykd_jax.parallel.mesh import make_mesh


def _cfg(**model):
    cfg = base_config()
    for group in (cfg.model, cfg.proxy):
        group.update(dict(vocab_size=128, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64))
        group.update(model)
    cfg.train.batch_size, cfg.train.seq_len = 8, 32
    cfg.align.batch_size, cfg.align.seq_len, cfg.align.logprob_chunk = 8, 32, 64
    cfg.posterior.batch_size, cfg.data.seq_len, cfg.posterior.chunk_tokens = 8, 32, 64
    cfg.data.store.k = 8
    cfg.align.lora.rank = 4
    cfg.mesh.shape = ml_collections.ConfigDict(dict(data=1, fsdp=4, tensor=2))
    return cfg


def test_plan_compiles_every_step_on_eight_devices():
    cfg = _cfg()
    mesh = make_mesh(cfg.mesh)
    plans = {p.name: p for p in plan.plan_steps(cfg, mesh)}
    assert set(plans) == set(plan.STEPS)
    for p in plans.values():
        assert p.argument_bytes > 0 and p.temp_bytes > 0 and p.total_bytes > p.argument_bytes, p
        assert p.hlo_flops > 0 and p.model_flops > 0, p
    # LoRA trains only the adapters: its optimizer state (in the arguments) is far smaller
    assert plans["sft_lora"].argument_bytes < plans["sft"].argument_bytes
    assert plans["dpo"].model_flops == 2 * plans["sft"].model_flops  # pairs: two rows per pair


def test_hlo_flops_match_model_flops_when_unrolled():
    """With unrolled layers XLA counts every layer: its FLOPs per device agree with the model's own
    count (the eval forward: matmuls + attention, within the attention-masking and loss slack)."""
    cfg = _cfg(scan_layers=False)
    mesh = make_mesh(cfg.mesh)
    (p,) = plan.plan_steps(cfg, mesh, ("eval",))
    assert 0.7 < p.hlo_flops / p.model_flops < 2.0, (p.hlo_flops, p.model_flops)


def test_extrapolation_is_linear_in_depth():
    cfg = _cfg()
    mesh = make_mesh(cfg.mesh)
    p2, p4 = plan.plan_steps(cfg, mesh, ("distill",), 2), plan.plan_steps(cfg, mesh, ("distill",), 4)
    (p6,) = plan.plan_steps(cfg, mesh, ("distill",), 6)
    (est,) = plan.extrapolate(p2, p4, {"distill": 6})
    assert est.layers == 6
    assert abs(est.argument_bytes - p6.argument_bytes) < 0.02 * p6.argument_bytes
    assert abs(est.total_bytes - p6.total_bytes) < 0.1 * p6.total_bytes


def test_cli_prints_table_and_rejects_bad_input(capsys, caplog):
    caplog.set_level(logging.INFO, logger="proxykd_jax.plan")
    args = [
        "--config=configs/demo.py",
        "--devices=8",
        "--steps=distill,eval",
        "--config.train.batch_size=8",
        "--config.train.seq_len=32",
    ]
    assert cli._run_plan(args) == 0
    out = capsys.readouterr().out
    assert "distill" in out and "eval" in out and "total GB" in out and "simulated CPU devices" in out
    assert "compiling the eval step (2 of 2)" in caplog.text  # each compile is announced (minutes at 70B)
    assert cli._run_plan(args[:2] + ["--steps=distill,warp"]) == 2
    assert "unknown step(s) ['warp']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli._run_plan(["--devices=nine"])


@pytest.mark.parametrize(
    "argv, sentence",
    [
        (["--config=nonexist.py"], "config file nonexist.py does not exist; give --config=PATH"),
        (["--devices=8"], "`proxykd plan` needs --config=PATH"),
        (["--config=configs/demo.py", "--config.train.batch_sise=8"], "train.batch_sise"),
        (["--config=configs/demo.py", "--config.run.overwrite", "False"], "stray argument 'False'"),
        (  # not about the devices: no advice on --devices
            ["--config=configs/demo.py", "--config.mesh.shape.fsdp=0", "--devices=2"],
            "use positive sizes and at most one -1; change mesh.shape.",
        ),
        (
            ["--config=configs/demo.py", "--config.mesh.shape.fsdp=4", "--devices=2"],
            "needs 4 devices, 2 available; change --devices or mesh.shape.",
        ),
    ],
)
def test_plan_bad_config_is_one_sentence(argv, sentence, capsys):
    """The plan reads its config as a stage does: a missing file, no --config, an unknown field or a stray
    argument is one line (exit 2), never a traceback."""
    assert cli._run_plan(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: proxykd plan: ") and sentence in err and len(err.strip().splitlines()) == 1, err


def _demo(*extra):
    return ["--config=configs/demo.py", "--devices=8", *extra]


@pytest.mark.parametrize(
    "extra, sentence",
    [
        (  # DPO's 2 x 4 rows split over 8 shards, but the align stage refuses align.batch_size=4
            ["--steps=dpo", "--config.align.batch_size=4"],
            "config.align.batch_size=4 is not a multiple of the mesh's data x fsdp = 1 x 8 batch shards",
        ),
        (  # distill refuses rows longer than the student's context (an imported Mistral's sliding window)
            ["--steps=distill", "--config.train.seq_len=256"],
            "config.train.seq_len=256 exceeds config.model.max_seq_len=128",
        ),
        (["--steps=sft", "--config.align.seq_len=256"], "config.align.seq_len=256 exceeds the max_seq_len 128"),
        (
            ["--steps=distill", "--config.train.steps=201", "--config.optim.grad_accum=2"],
            "config.train.steps=201 is not a multiple of optim.grad_accum=2",
        ),
    ],
)
def test_plan_runs_the_stage_checks_before_compiling(extra, sentence, capsys, caplog):
    """A config its stage refuses is refused by the plan with the stage's sentence, before any compile."""
    caplog.set_level(logging.INFO, logger="proxykd_jax.plan")
    assert cli._run_plan(_demo(*extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: proxykd plan: ") and sentence in err and len(err.strip().splitlines()) == 1, err
    assert "compiling" not in caplog.text


def test_plan_checks_the_vocabulary_against_the_tokenizer(tmp_path, capsys, caplog):
    from proxykd_jax.models.tokenizer import build_word_tokenizer

    caplog.set_level(logging.INFO, logger="proxykd_jax.plan")
    tok = build_word_tokenizer([f"w{i}" for i in range(40)], tmp_path / "tok")
    args = _demo("--steps=distill", f"--config.data.tokenizer={tmp_path / 'tok'}", f"--config.run.dir={tmp_path}/r")
    assert cli._run_plan([*args, "--config.model.vocab_size=16"]) == 2
    err = capsys.readouterr().err
    assert f"config.model.vocab_size=16 is smaller than the {len(tok)} tokens of the tokenizer" in err, err
    assert "compiling" not in caplog.text


def test_plan_checks_a_start_folder_against_its_group(tmp_path, capsys, caplog):
    """Raising model.max_seq_len, as the plan's own refusal of a long train.seq_len suggests, passed the plan while
    distill refused it: the start folder's config.json says 128. The plan now refuses it as distill does."""
    import runpy

    from flax import nnx

    from proxykd_jax.models import hf
    from proxykd_jax.models.llama import Llama, ModelConfig

    caplog.set_level(logging.INFO, logger="proxykd_jax.plan")
    group = runpy.run_path("configs/demo.py")["get_config"]().model
    model_cfg = ModelConfig.from_config(group)
    hf.save_hf(Llama(model_cfg, rngs=nnx.Rngs(0)), model_cfg, tmp_path / "student")
    args = _demo("--steps=distill", f"--config.model.init_from={tmp_path / 'student'}", "--config.train.seq_len=96")
    assert cli._run_plan([*args, "--config.model.max_seq_len=256"]) == 2
    err = capsys.readouterr().err
    assert "student/config.json disagrees with config.model on max_seq_len=128 (config: 256)" in err, err
    assert "compiling" not in caplog.text


def test_plan_checks_start_folders_of_the_stages_that_start_from_them_only(tmp_path):
    """Only align (proxy.init_from) and distill (model.init_from) start from a folder: posterior runs the aligned
    proxy and eval the distilled students, so their plans take a start folder that disagrees with its group."""
    import runpy

    from flax import nnx

    from proxykd_jax.models import hf
    from proxykd_jax.models.llama import Llama, ModelConfig

    cfg = runpy.run_path("configs/demo.py")["get_config"]()
    for group in ("model", "proxy"):
        model_cfg = ModelConfig.from_config(cfg[group])
        hf.save_hf(Llama(model_cfg, rngs=nnx.Rngs(0)), model_cfg, tmp_path / group)
        cfg[group].init_from, cfg[group].max_seq_len = str(tmp_path / group), 2 * model_cfg.max_seq_len
    plan.check(cfg, ("posterior", "eval"), 8)
    for step, group in (("sft", "proxy"), ("distill", "model")):
        with pytest.raises(ProxyKDError, match=f"{group}/config.json disagrees with config.{group} on max_seq_len"):
            plan.check(cfg, (step,), 8)


def test_plan_layers_takes_two_depths(capsys):
    assert cli._run_plan(_demo("--steps=eval", "--layers=2")) == 2
    err = capsys.readouterr().err
    assert "--layers takes two depths A,B with 2 <= A < B (e.g. --layers=2,4;" in err and "got '2'" in err, err
    assert cli._run_plan(_demo("--steps=eval", "--layers=1,2")) == 2
    assert "got '1,2'" in capsys.readouterr().err


def test_eval_row_runs_eval_batch_of_data_rows():
    """The eval row is the eval stage's forward: eval.batch_size rows of data.seq_len tokens."""
    cfg = _cfg()
    cfg.eval.batch_size, cfg.data.seq_len, cfg.train.batch_size, cfg.train.seq_len = 16, 24, 8, 32
    mesh = make_mesh(cfg.mesh)
    (p,) = plan.plan_steps(cfg, mesh, ("eval",))
    cfg.eval.batch_size = 32
    (p2,) = plan.plan_steps(cfg, mesh, ("eval",))
    assert p2.model_flops == 2 * p.model_flops  # the rows are eval.batch_size's
    assert (p.rows, p.seq_len) == (16, 24)


def test_plan_prints_what_each_row_assumed(capsys, tmp_path):
    """Rows and sequence length per row with their config fields, the peak and limit flags, remat and the
    attention path compiled; a row that does not fit gets a hint; no tokenizer: said so."""
    args = _demo(
        "--steps=distill,eval", "--config.eval.batch_size=24", "--limit-gb=1e-9", f"--config.run.dir={tmp_path}/r"
    )
    assert cli._run_plan(args) == 0
    out = capsys.readouterr().out
    header, table = out[: out.index("step |")], out[out.index("total GB") :]
    assert "--peak-tflops" in header and "--limit-gb" in header and "model.remat=none" in header, header
    assert "attention blocked" in header and "float32" in header, header
    assert "unrolled layers" in header, header  # the demo's 2 layers with scan_layers=auto
    assert "rows" in out and "seq" in out and "HLO TFLOP" not in out
    assert " 24 |" in table and "eval.batch_size" in table and "data.seq_len" in table, table
    assert "eval does not fit" in table and "eval.batch_size" in table.split("eval does not fit")[1], table
    assert "distill does not fit" in table and "--config.model.remat=full" in table, table
    assert "vocab_size not checked against a tokenizer" in table, table


def test_plan_header_says_a_gpu_run_unrolls_what_the_cpu_plan_scanned(capsys, tmp_path):
    """scan_layers=auto without remat scans deep models on CPU but unrolls them on a GPU: the header says so."""
    args = _demo("--steps=eval", "--config.model.num_layers=12", f"--config.run.dir={tmp_path}/r")
    assert cli._run_plan(args) == 0
    header = capsys.readouterr().out.split("step |")[0]
    assert "student: model.remat=none, scanned layers (model.scan_layers=auto: a GPU run unrolls them)" in header


def test_cut_keeps_both_kinds_of_a_mixed_model():
    sliding, full = "sliding_attention", "full_attention"
    gemma = (sliding,) * 5 + (full,)
    assert compiled_steps._cut(gemma, 2) == (sliding, full)
    assert compiled_steps._cut(gemma, 4) == (sliding,) * 3 + (full,)
    assert compiled_steps._cut(gemma, 8) == gemma + (sliding, sliding)
    assert compiled_steps._cut((True, True, False), 1) == (False,)  # one NoPE layer: (True,) would be stored as None
    assert compiled_steps._cut((full,) * 4, 2) == (full, full)


def test_a_mixed_model_planned_at_two_depths_extrapolates_to_full_depth():
    """`--layers=A,B` on a model with per-layer fields (`layer_types`: Gemma 3's sliding and full layers;
    `rope_layers`: SmolLM3's NoPE layers) was refused: they kept the full depth's length. The cut keeps both kinds,
    so the scanned body is the full model's and the line through 2 and 4 layers lands on 6."""
    types = ("sliding_attention",) * 5 + ("full_attention",)
    cfg = _cfg(
        num_layers=6, scan_layers=True, sliding_window=8, layer_types=types, rope_layers=(True,) * 3 + (False,) * 3
    )
    mesh = make_mesh(cfg.mesh)
    p2, p4 = plan.plan_steps(cfg, mesh, ("distill",), 2), plan.plan_steps(cfg, mesh, ("distill",), 4)
    (p6,) = plan.plan_steps(cfg, mesh, ("distill",))
    (est,) = plan.extrapolate(p2, p4, {"distill": 6})
    assert abs(est.argument_bytes - p6.argument_bytes) < 0.02 * p6.argument_bytes
    assert abs(est.total_bytes - p6.total_bytes) < 0.1 * p6.total_bytes
