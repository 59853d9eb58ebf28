"""Wrong values of single config fields that `config.validate` let through, found by trying a few wrong
values of every field of configs/demo.py and configs/report.py: each ended in a traceback (a NaN sent as
JSON, int(nan), a modulo by zero, numpy's seed range, a ValueError deep in the demo's teacher), trained to
NaN after the models were built, or ran silently with a nonsense value (a negative rate limit as no limit,
a NaN clip norm as no clipping, a NaN proxy init). Now each is refused before any work with one sentence
naming the field, the value and the accepted range; the values on the edge of each range still pass.
"""

from __future__ import annotations

import math
import os
import runpy
import subprocess
import sys

import pytest

from proxykd_jax import config as config_lib
from proxykd_jax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAN, INF = math.nan, math.inf

# (stage, field, value, what the sentence says besides `config.<field>=<value>`)
REFUSED = [
    # tracebacks
    ("distill", "model.num_kv_heads", 0, "must be positive"),
    ("align", "proxy.num_kv_heads", 0, "must be positive"),
    ("collect", "collect.temperature", NAN, "finite number of at least 0"),
    ("collect", "collect.top_p", INF, "must lie in [0, 1]"),
    ("prepare", "data.prepare_buffer_mb", NAN, "finite number above 0"),
    ("prepare", "data.prepare_buffer_mb", INF, "finite number above 0"),
    ("posterior", "data.store.shard_mb", NAN, "finite number above 0"),
    ("posterior", "data.store.shard_mb", INF, "finite number above 0"),
    ("distill", "distill.loss.alpha", -1.0, "0 = the SFT baseline"),
    ("distill", "data.shuffle_seed", -1, "at least 0"),
    ("distill", "data.shuffle_seed", 10**12, "at most 4294967295"),
    ("demo", "demo.teacher_d_model", 0, "at least 1"),
    ("demo", "demo.teacher_d_model", 20, "multiple of 8"),
    ("demo", "demo.teacher_num_layers", 0, "at least 1"),
    # ran collect, prepare and prior, then stopped at align: the proxy starts as the teacher's weights
    ("demo", "demo.teacher_d_model", 96, "must equal proxy.d_model (64)"),
    ("demo", "demo.teacher_num_layers", 3, "must equal proxy.num_layers (2)"),
    ("demo", "proxy.head_dim", 8, "must equal demo.teacher_d_model / proxy.num_heads (16)"),
    ("report", "demo.teacher_num_layers", 1, "must equal proxy.num_layers (2)"),
    # and its numerics: the teacher's are ModelConfig's defaults (teacher/known.py), so were the proxy start's
    ("demo", "proxy.qk_norm", True, "must equal the known teacher's (False)"),
    ("demo", "proxy.rope_theta", 500000.0, "must equal the known teacher's (10000.0)"),
    ("demo", "proxy.rope_scaling", ("linear", 2.0), "must equal the known teacher's (None)"),
    ("report", "proxy.tie_embeddings", True, "must equal the known teacher's (False)"),
    # (and the numerics added since: the demo's proxy start has no window, align refused it after collect)
    ("demo", "proxy.sliding_window", 8, "must equal the known teacher's (None)"),
    ("demo", "demo.teacher_seed", -1, "at least 0"),
    ("demo", "demo.teacher_entropy", 0.0, "must lie in (0, 6.2"),
    ("demo", "demo.teacher_entropy", NAN, "must lie in (0, 6.2"),
    ("demo", "demo.teacher_entropy", 7.0, "must lie in (0, 6.2"),
    ("report", "report.style_words", -1, "at least 0"),
    ("report", "report.style_words", 100_000, "at most 508"),
    ("report", "report.general_prompts", -1, "at least 1"),
    # trained to NaN or inf (exit 1 after the models were built), or wrote a NaN posterior store
    ("distill", "optim.lr", INF, "finite number above 0"),
    ("align", "align.sft_lr", INF, "finite number above 0"),
    ("align", "align.dpo_lr", INF, "finite number above 0"),
    ("align", "align.beta", INF, "finite"),
    ("align", "align.nll_weight", NAN, "finite number of at least 0"),
    ("align", "align.nll_weight", INF, "finite number of at least 0"),
    ("distill", "distill.loss.alpha", NAN, "finite number of at least 0"),
    ("distill", "distill.loss.alpha", INF, "finite number of at least 0"),
    ("distill", "optim.b1", -1.0, "must lie in [0, 1)"),
    ("distill", "optim.b2", NAN, "must lie in [0, 1)"),
    ("distill", "optim.eps", 0.0, "finite number above 0"),
    ("distill", "optim.eps", NAN, "finite number above 0"),
    ("distill", "optim.weight_decay", NAN, "finite number of at least 0"),
    ("distill", "model.rms_eps", -1.0, "finite number above 0"),
    ("distill", "model.rope_theta", 0.0, "finite number above 0"),
    ("distill", "model.rope_theta", NAN, "finite number above 0"),
    ("align", "proxy.rope_theta", -1.0, "finite number above 0"),
    ("posterior", "posterior.beta", INF, "finite number above 0"),
    # ran with a nonsense value, silently
    ("align", "align.nll_weight", -1.0, "finite number of at least 0"),
    ("align", "align.lora.rank", -1, "at least 0"),
    ("align", "align.temperature", INF, "finite"),
    ("distill", "distill.loss.temperature", INF, "finite number above 0"),
    ("distill", "optim.clip_norm", NAN, "0 = no clipping"),
    ("distill", "optim.clip_norm", -1.0, "0 = no clipping"),
    ("distill", "train.peak_flops", -1.0, "finite number of at least 0"),
    ("prepare", "data.prepare_buffer_mb", -1.0, "finite number above 0"),
    ("posterior", "data.store.shard_mb", -1.0, "finite number above 0"),
    ("prior", "prior.buffer_pairs", 0, "at least 1"),
    ("prior", "prior.buffer_pairs", -1, "at least 1"),
    ("collect", "collect.requests_per_minute", -1, "at least 0"),
    ("collect", "collect.tokens_per_minute", -1, "at least 0"),
    ("collect", "collect.backoff_initial_s", -1.0, "finite number of at least 0"),
    ("collect", "collect.backoff_max_s", NAN, "finite number of at least 0"),
    ("collect", "collect.temperature", -1.0, "finite number of at least 0"),
    ("distill", "mesh.distributed.num_processes", -1, "at least 0"),
    ("demo", "demo.proxy_noise", NAN, "finite number of at least 0"),
    ("report", "report.specialise_noise", NAN, "finite number of at least 0"),
    ("report", "report.style_boost", NAN, "finite number"),
    ("report", "report.pretrain_steps", -1, "at least 0"),
    ("report", "report.chartok_sft_steps", -1, "at least 0"),
    ("report", "report.pretrain_lr", -1.0, "finite number above 0"),
    ("report", "report.nll_beta", -1.0, "finite number above 0"),
    ("serve", "serve.batch_window_ms", NAN, "finite number of at least 0"),
    ("serve", "serve.faults.slow_delay_s", -1.0, "finite number of at least 0"),
    ("serve", "serve.faults.retry_after_s", NAN, "finite number of at least 0"),
    ("serve", "serve.faults.drop_rate", -0.5, "must lie in [0, 1]"),
]

# values at the edges of those ranges, which keep their meaning
ACCEPTED = [
    ("distill", "optim.clip_norm", 0.0),  # no clipping
    ("distill", "distill.loss.alpha", 0.0),  # the SFT baseline
    ("distill", "optim.weight_decay", 0.0),
    ("distill", "optim.b2", 0.0),
    ("distill", "train.peak_flops", 0.0),  # measured
    ("distill", "data.shuffle_seed", 2**32 - 1),
    ("align", "align.nll_weight", 0.0),
    ("align", "align.temperature", 0.0),  # greedy
    ("align", "align.lora.rank", 0),  # full fine-tuning
    ("collect", "collect.temperature", 0.0),
    ("collect", "collect.top_p", 0.0),
    ("collect", "collect.backoff_initial_s", 0.0),
    ("collect", "collect.requests_per_minute", 0),  # unlimited
    ("posterior", "posterior.n_max", INF),  # the proxy alone: a finite, normalised store
    ("posterior", "prior.kappa", INF),  # the n-gram prior alone
    ("demo", "demo.proxy_noise", 0.0),
    ("demo", "demo.teacher_entropy", 6.0),
    ("report", "report.style_words", 0),
    ("report", "report.style_boost", -2.0),
    ("report", "report.pretrain_steps", 0),
    ("serve", "serve.batch_window_ms", 0.0),  # no waiting for more requests
]


def _config(field: str, value):
    name = "report.py" if field.startswith("report.") else "demo.py"
    cfg = runpy.run_path(os.path.join(REPO, "configs", name))["get_config"]()
    *groups, leaf = field.split(".")
    with cfg.unlocked():
        node = cfg
        for group in groups:
            node = node[group]
        node[leaf] = value
    return cfg


def _ids(rows):
    return [f"{r[0]}-{r[1]}={r[2]!r}" for r in rows]


@pytest.mark.parametrize("stage, field, value, expect", REFUSED, ids=_ids(REFUSED))
def test_a_wrong_value_is_refused_in_one_sentence_naming_field_value_and_range(stage, field, value, expect):
    with pytest.raises(ConfigError) as info:
        config_lib.validate(_config(field, value), stage)
    message = str(info.value)
    assert message.startswith(f"config.{field}={value!r} "), message
    assert expect in message, message
    assert "\n" not in message and message.endswith("."), message


@pytest.mark.parametrize("stage, field, value", ACCEPTED, ids=_ids(ACCEPTED))
def test_values_on_the_edge_of_each_range_still_pass(stage, field, value):
    config_lib.validate(_config(field, value), stage)


@pytest.mark.parametrize(
    "stage, override",
    [("collect", "--config.collect.temperature=nan"), ("distill", "--config.model.num_kv_heads=0")],
)
def test_the_cli_refuses_them_before_jax_starts(stage, override, tmp_path):
    """Both ended in a traceback: a NaN temperature when the first request was serialised, the modulo by
    zero inside `validate` itself."""
    env = os.environ | {"PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    argv = [sys.executable, "-m", "proxykd_jax", stage, "--config=configs/demo.py", f"--config.run.dir={tmp_path}/r"]
    proc = subprocess.run([*argv, override], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    field = override.removeprefix("--config.").split("=")[0]
    assert len(lines) == 1 and f"config.{field}=" in lines[0], proc.stderr[-2000:]
    assert "proxykd_jax.parallel.distributed" not in proc.stderr  # refused before jax started
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("output", ["/tmp/elsewhere", "../student", "a/b"])
def test_a_distill_output_outside_the_run_directory_is_refused(output):
    """distill.output names a student folder inside the run directory (eval, export and status look there); an
    absolute or escaping path wrote the student elsewhere, where they did not find it."""
    with pytest.raises(ConfigError, match=r"config.distill.output=.* must be a folder name inside the run directory"):
        config_lib.validate(_config("distill.output", output), "distill")
    config_lib.validate(_config("distill.output", "student_v2"), "distill")


@pytest.mark.parametrize(
    "stage, group, field, value",
    [("demo", "demo", "teacher_tokenizer", "char"), ("report", "report", "settings", "chartok")],
)
def test_a_character_teacher_may_have_its_own_shape(stage, group, field, value):
    """Its proxy is a random model of the proxy group's shape (it cannot start from the teacher's weights)."""
    cfg = _config("demo.teacher_num_layers", 3)
    with cfg.unlocked():
        cfg.demo.teacher_d_model, cfg[group][field] = 96, value
        cfg.proxy.qk_norm = True
        cfg.proxy.vocab_size = cfg.model.vocab_size = 512
    config_lib.validate(cfg, stage)


def test_the_specialised_setting_s_proxy_may_have_its_own_shape():
    """Its proxy is a random init of the proxy group pre-trained on the general teacher's samples
    (report/settings.py `_specialised`): only the perturbed setting starts the proxy from a teacher's weights."""
    cfg = _config("report.settings", "specialised")
    with cfg.unlocked():
        cfg.demo.teacher_num_layers = int(cfg.proxy.num_layers) + 1
        cfg.proxy.qk_norm = True
    config_lib.validate(cfg, "report")
    for settings in ("specialised,perturbed", ""):  # "": every setting
        with cfg.unlocked():
            cfg.report.settings = settings
        with pytest.raises(ConfigError, match="must equal proxy.num_layers"):
            config_lib.validate(cfg, "report")
