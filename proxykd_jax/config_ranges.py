"""The value ranges of config fields, as tables: whole numbers with a lower (and upper) bound, positive
and non-negative floats (finite unless the table allows infinity), fractions and fixed word choices.
`check_ranges` runs them for the groups a stage reads (`config.validate`, and stages called as a library),
each refusal one sentence naming the field, the value and the range.
"""

from __future__ import annotations

import math

from proxykd_jax.errors import ConfigError
from proxykd_jax.teacher.config import TOKEN_LIMITS

# (field, smallest allowed value): counts and sizes a stage divides by or loops over.
_AT_LEAST = (
    ("train.steps", 1),
    ("train.batch_size", 1),
    ("train.seq_len", 1),
    ("train.log_every", 1),
    ("train.checkpoint_every", 0),
    ("train.keep_checkpoints", 1),
    ("train.eval_every", 0),
    ("train.steps_per_call", 0),
    ("optim.grad_accum", 1),
    ("optim.warmup_steps", 0),
    ("optim.decay_steps", 0),
    ("data.batch_size", 1),
    ("data.seq_len", 1),
    ("data.records_per_file", 1),
    ("data.num_epochs", 0),
    ("data.num_workers", 0),
    ("data.store.k", 1),
    ("data.teacher_topk", 1),
    ("data.packing_bins", 0),
    ("data.worker_buffer_size", 1),
    ("data.shuffle_seed", 0),  # numpy's seed range: [0, 2**32)
    ("align.batch_size", 1),
    ("align.sample_batch_size", 1),
    ("align.eval_batch_size", 1),
    ("align.sft_steps", 0),
    ("align.rounds", 0),
    ("align.max_new_tokens", 1),
    ("align.warmup_steps", 0),
    ("align.checkpoint_every", 0),
    ("align.samples_per_prompt", 1),
    ("align.prompts_per_round", 0),
    ("align.dpo_steps_per_round", 0),
    ("align.heldout_samples", 0),
    ("align.logprob_chunk", 1),
    ("align.seq_len", 0),
    ("align.lora.rank", 0),
    ("prior.ngram_order", 1),
    ("prior.exact_top_s", 1),
    ("prior.ngram_top_s", 1),
    ("prior.buffer_pairs", 1),
    ("posterior.batch_size", 1),
    ("posterior.chunk_tokens", 1),
    ("posterior.num_samples", 1),
    ("posterior.eb_refine_steps", 0),
    ("distill.loss.num_samples", 1),
    ("distill.loss.chunk_size", 1),
    ("eval.batch_size", 1),
    ("eval.max_samples", 0),
    ("eval.max_new_tokens", 0),
    ("eval.generate_prompts", 0),
    ("export.step", 0),
    ("collect.concurrency", 1),
    ("collect.samples_per_prompt", 1),
    ("collect.max_attempts", 1),
    ("collect.max_tokens", 1),
    ("collect.top_logprobs", 0),
    ("collect.requests_per_minute", 0),
    ("collect.tokens_per_minute", 0),
    ("mesh.distributed.num_processes", 0),
    ("mesh.distributed.heartbeat_timeout_s", 1),
    ("serve.port", 0),
    ("serve.max_batch", 1),
    ("serve.max_tokens_limit", 1),
    ("serve.max_body_bytes", 1),
    ("demo.num_prompts", 1),
    ("demo.samples_per_prompt", 1),
    ("demo.max_new_tokens", 1),
    ("demo.teacher_d_model", 1),
    ("demo.teacher_num_layers", 1),
    ("demo.teacher_seed", 0),  # numpy's seeds are non-negative
    ("report.general_prompts", 1),
    ("report.pretrain_steps", 0),
    ("report.chartok_sft_steps", 0),
    ("report.style_words", 0),
    ("choose.eval_every", 1),
)
# what a refused value of these fields would have meant, and what to use instead
_HINTS = {
    "data.teacher_topk": (
        " (it is the width of the teacher head; 0 does not switch it off: a corpus without top log-probs "
        "stores no head, and --config.posterior.use_teacher_topk=False ignores one)"
    ),
    "prior.exact_top_s": " (next tokens kept per prompt prefix: the posterior cannot use tables without any)",
    "prior.ngram_top_s": " (continuations kept per n-gram context: the posterior cannot use tables without any)",
    "distill.loss.alpha": " (0 = the SFT baseline)",
    "optim.clip_norm": " (0 = no clipping)",
    "train.peak_flops": " (0 = measure a matmul at start)",
}
_AT_MOST = (("collect.top_logprobs", 20), ("serve.port", 65535), ("data.shuffle_seed", 2**32 - 1))
# finite and > 0: an infinite learning rate, temperature or epsilon trains to NaN (or writes a NaN store)
_POSITIVE_FLOATS = (
    "optim.lr",
    "optim.eps",  # 0: a parameter without gradient (an unused token's embedding) gets 0 / 0
    "align.sft_lr",
    "align.dpo_lr",
    "distill.loss.temperature",
    "posterior.beta",
    "model.rms_eps",
    "model.rope_theta",
    "proxy.rms_eps",
    "proxy.rope_theta",
    "data.prepare_buffer_mb",
    "data.store.shard_mb",
    "report.pretrain_lr",  # the pre-training's align.sft_lr
    "report.nll_beta",  # the nll variant's align.beta
)
# finite and >= 0: weights, scales and seconds, where a NaN trains to NaN (or is sent as invalid JSON) and a
# negative one would silently mean "off" (clip_norm, peak_flops, the backoff) or the opposite (nll_weight)
_NON_NEGATIVE_FLOATS = (
    "prior.kappa",
    "posterior.n_max",
    "optim.weight_decay",
    "optim.clip_norm",
    "align.nll_weight",
    "distill.loss.alpha",
    "train.peak_flops",
    "collect.temperature",
    "collect.backoff_initial_s",
    "collect.backoff_max_s",
    "demo.proxy_noise",
    "report.specialise_noise",
    "serve.batch_window_ms",
    "serve.faults.retry_after_s",
    "serve.faults.slow_delay_s",
)
# pseudo-counts, used as set where the empirical-Bayes fit is off: infinity is their limit (the n-gram prior
# alone, the proxy alone), which stores finite, normalised rows
_INFINITY_ALLOWED = ("prior.kappa", "posterior.n_max")
# (field, low, high, whether high is allowed): fractions and mixture weights.
_FRACTIONS = (
    ("distill.loss.jsd_beta", 0.0, 1.0, False),
    ("distill.loss.skew_alpha", 0.0, 1.0, False),
    ("posterior.eb_holdout_fraction", 0.0, 1.0, False),
    ("optim.min_lr_ratio", 0.0, 1.0, True),
    ("align.top_p", 0.0, 1.0, True),
    ("serve.faults.fail_429_rate", 0.0, 1.0, True),
    ("serve.faults.fail_500_rate", 0.0, 1.0, True),
    ("serve.faults.slow_rate", 0.0, 1.0, True),
    ("serve.faults.drop_rate", 0.0, 1.0, True),
    ("serve.faults.malformed_rate", 0.0, 1.0, True),
    ("collect.top_p", 0.0, 1.0, True),
    ("optim.b1", 0.0, 1.0, False),
    ("optim.b2", 0.0, 1.0, False),
)
# (field, allowed values): fields with a fixed set of words (align.loss_type/reference: `_check_align`).
_CHOICES = (
    ("data.on_error", ("error", "skip")),
    ("data.teacher_head", ("auto", "exact", "bytes")),
    ("data.store.index_dtype", ("auto", "uint16", "uint32", "bits")),
    ("data.store.value_dtype", ("float32", "bfloat16", "float16", "uint8")),
    ("data.store.tail_dtype", ("float16", "float32")),
    ("posterior.weight_normalize", ("mean", "sum")),
    ("collect.api", ("chat", "completions")),
    ("collect.token_limit", TOKEN_LIMITS),
    ("serve.source", ("hf", "known")),
    ("demo.teacher_tokenizer", ("same", "char")),
)


def get_field(cfg, dotted: str):
    """The value of the dotted field `dotted` of `cfg`, or None where it has no such field."""
    node = cfg
    for part in dotted.split("."):
        if part not in node:
            return None
        node = node[part]
    return node


def check_ranges(cfg, groups) -> None:
    """The range tables above for the fields of `groups` (`validate` runs them; a stage run as a library
    call, without it, may run its own groups')."""
    for field, low in _AT_LEAST:
        value = get_field(cfg, field)
        if field.split(".")[0] not in groups or value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config.{field}={value!r} must be a whole number (>= {low}).")
        if value < low:
            raise ConfigError(
                f"config.{field}={value} must be at least {low}{_HINTS.get(field, '')}; "
                f"set --config.{field} to {low} or more."
            )
    for field in _POSITIVE_FLOATS + _NON_NEGATIVE_FLOATS:
        value = get_field(cfg, field)
        if field.split(".")[0] not in groups or value is None:
            continue
        positive, value = field in _POSITIVE_FLOATS, float(value)
        if not (value > 0 if positive else value >= 0) or (math.isinf(value) and field not in _INFINITY_ALLOWED):
            finite = "" if field in _INFINITY_ALLOWED else "finite "
            what = f"{finite}number {'above 0' if positive else 'of at least 0'}"
            raise ConfigError(
                f"config.{field}={value!r} must be a {what}{_HINTS.get(field, '')}; set --config.{field} to one."
            )
    for field, high in _AT_MOST:
        value = get_field(cfg, field)
        if field.split(".")[0] in groups and value is not None and value > high:
            raise ConfigError(f"config.{field}={value} must be at most {high}; set --config.{field} to {high} or less.")
    for field, low, high, closed in _FRACTIONS:
        value = get_field(cfg, field)
        if field.split(".")[0] not in groups or value is None:
            continue
        if not (low <= float(value) <= high if closed else low <= float(value) < high):
            raise ConfigError(f"config.{field}={value!r} must lie in [{low:g}, {high:g}{']' if closed else ')'}.")
    from proxykd_jax.bayes.config import KERNELS, MODES, OWN_TOKEN
    from proxykd_jax.data.config import SPLITS
    from proxykd_jax.losses.divergences import KINDS, TAIL_MODES

    choices = _CHOICES + (
        ("posterior.mode", MODES),
        ("posterior.kernel", KERNELS),
        ("distill.loss.divergence", KINDS),
        ("distill.loss.tail_mode", TAIL_MODES),
        ("eval.split", SPLITS),  # the prepared splits (data.split.*)
        ("distill.split", SPLITS),
        ("distill.eval_split", SPLITS),
        ("choose.eval_split", SPLITS),
    )
    for field, allowed in choices:
        value = get_field(cfg, field)
        if field.split(".")[0] in groups and value is not None and value not in allowed:
            raise ConfigError(
                f"config.{field}={value!r} must be one of {', '.join(allowed)}; set --config.{field} to one of them."
            )
    own = get_field(cfg, "posterior.own_token")
    if "posterior" in groups and own is not None and str(own) not in OWN_TOKEN and not _unit_number(own):
        raise ConfigError(
            f"config.posterior.own_token={own!r} must be one of {', '.join(OWN_TOKEN)} or a weight from 0 to 1 "
            "(e.g. 0.5); set --config.posterior.own_token to one of them."
        )


def _unit_number(value) -> bool:
    try:
        return 0.0 <= float(value) <= 1.0  # (NaN fails both)
    except (TypeError, ValueError):
        return False
