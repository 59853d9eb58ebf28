"""The built-in demo: a known tiny teacher served over HTTP, a perturbed proxy, a small student.

    make demo        (= python -m proxykd_jax demo --config=configs/demo.py)

Sized to finish in minutes on a 2-core CPU; every field can be overridden,
e.g. --config.demo.num_prompts=1000 --config.train.steps=600.
"""

from proxykd_jax.config import base_config


def _shape(group, d_model, num_layers, num_heads, num_kv_heads, d_ff, vocab=512):
    group.vocab_size, group.d_model, group.num_layers = vocab, d_model, num_layers
    group.num_heads, group.num_kv_heads, group.head_dim, group.d_ff = (
        num_heads,
        num_kv_heads,
        d_model // num_heads,
        d_ff,
    )
    group.max_seq_len = 128


def get_config():
    cfg = base_config()
    cfg.run.dir = "runs/demo"
    _shape(cfg.proxy, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=128)  # = the teacher's shape
    _shape(cfg.model, d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, d_ff=64)  # the student
    cfg.data.seq_len = 64
    cfg.data.batch_size = 16
    cfg.data.store.k = 32
    cfg.data.num_epochs = 0  # repeat the (small) split: train.steps decides how long the student trains
    cfg.train.seq_len = 64
    cfg.train.batch_size = 16
    cfg.train.steps = 300
    cfg.train.checkpoint_every = 100
    cfg.train.log_every = 25
    cfg.optim.lr = 3e-3
    cfg.optim.warmup_steps = 20
    cfg.align.sft_steps = 60
    cfg.align.sft_lr = 1e-3
    cfg.align.rounds = 2
    cfg.align.dpo_lr = 1e-3  # benchmarks/align_known_teacher.py: 1e-3 beats 2e-4 (BUILD_NOTES)
    cfg.align.prompts_per_round = 256
    cfg.align.batch_size = 16
    cfg.align.max_new_tokens = 25
    cfg.align.checkpoint_every = 50
    cfg.posterior.batch_size = 32
    cfg.collect.concurrency = (
        1  # one request at a time: the served teacher draws in a fixed order (reproducible corpus)
    )
    cfg.posterior.eb_holdout_fraction = 0.2
    cfg.eval.max_samples = 128
    return cfg.lock()
