"""The batch steps the stages run, one table: which stage runs each, which model it runs, whether it has a
backward pass, and the config fields its rows and sequence length come from.

`proxykd plan` compiles these steps and names the fields beside its figures; the CLI's line for a device out
of memory names the same steps and fields (`exhaustion`). Both read them here.
"""

from __future__ import annotations

STEPS = ("distill", "sft", "sft_lora", "dpo", "dpo_lora", "posterior", "eval")
ALIGN = ("sft", "sft_lora", "dpo", "dpo_lora")
# the stage that runs each step
STAGE = {"distill": "distill", "posterior": "posterior", "eval": "eval"} | dict.fromkeys(ALIGN, "align")
TRAINS = ("distill", *ALIGN)  # steps with a backward pass (remat matters)


def model_group(name: str) -> str:
    """The config group of the model step `name` runs: the student (`model`) or the proxy."""
    return "model" if name in ("distill", "eval") else "proxy"


def stage_steps(stage: str, cfg=None) -> tuple[str, ...]:
    """The steps `proxykd <stage>` runs with `cfg` (align: the LoRA steps where align.lora.rank > 0; without
    a config, the full ones); () for a stage that runs none of them."""
    if stage == "align":
        lora = cfg is not None and int(cfg.align.lora.get("rank") or 0) > 0
        return ("sft_lora", "dpo_lora") if lora else ("sft", "dpo")
    return (stage,) if STAGE.get(stage) == stage else ()


def row_shape(cfg, name: str) -> tuple[int, int, str, str]:
    """(rows, seq_len, the field(s) rows come from, the field seq_len comes from) of the batch step `name`
    runs in its stage."""
    if name == "distill":
        return int(cfg.train.batch_size), int(cfg.train.seq_len), "train.batch_size", "train.seq_len"
    if name in ALIGN:
        pairs, length = int(cfg.align.batch_size), int(cfg.align.seq_len or cfg.data.seq_len)
        seq_field = "align.seq_len" if cfg.align.seq_len else "data.seq_len"
        if name.startswith("dpo"):  # a chosen and a rejected row per pair
            return 2 * pairs, length, "2 x align.batch_size", seq_field
        return pairs, length, "align.batch_size", seq_field
    if name == "posterior":
        return int(cfg.posterior.batch_size), int(cfg.data.seq_len), "posterior.batch_size", "data.seq_len"
    if name == "eval":  # eval scores one sample per row of data.seq_len (`eval.metrics.eval_batches`)
        return int(cfg.eval.batch_size), int(cfg.data.seq_len), "eval.batch_size", "data.seq_len"
    raise ValueError(f"unknown step {name!r}; choose from {', '.join(STEPS)}.")
