"""Defaults of the config groups the training modules read: `optim` (train/optim.py), `train` (the loop,
train/loop.py), `distill` (train/distill.py) and `export` (train/export.py). It imports no optax, orbax, grain or
flax: config validation and `proxykd <stage> --help` read this module alone; each owner re-exports its group's
function as `default_config`."""

import ml_collections

from proxykd_jax import losses


def optim_config() -> ml_collections.ConfigDict:
    """Defaults of the `optim` config group."""
    cd = ml_collections.ConfigDict()
    cd.lr = 3e-4  # peak learning rate (reached after warm-up)
    cd.warmup_steps = 100  # linear warm-up from 0 over this many optimizer updates
    cd.decay_steps = 0  # cosine decay length in optimizer updates incl. warm-up; 0 = train.steps // grad_accum
    cd.min_lr_ratio = 0.1  # final learning rate as a fraction of `lr`
    cd.weight_decay = 0.1  # decoupled weight decay (AdamW) on weight matrices and embeddings (not norms, biases)
    cd.b1 = 0.9  # Adam first-moment decay
    cd.b2 = 0.95  # Adam second-moment decay
    cd.eps = 1e-8  # Adam epsilon
    cd.clip_norm = 1.0  # clip the (accumulated) gradient to this global L2 norm; 0 = no clipping
    cd.grad_accum = 1  # micro-batches per optimizer update (their token-weighted mean gradient); each is one loop step
    return cd


def loop_config() -> ml_collections.ConfigDict:
    """Defaults of the `train` config group."""
    cd = ml_collections.ConfigDict()
    cd.steps = 1000  # loop steps (micro-batches; optimizer updates = steps // optim.grad_accum)
    cd.batch_size = 8  # global batch rows per step (all processes together)
    cd.seq_len = 256  # tokens per row
    cd.checkpoint_every = 200  # save every N steps and at the end; 0 = never save or resume
    cd.keep_checkpoints = 3  # keep the newest K checkpoints
    cd.log_every = 10  # write metrics (JSONL, TensorBoard, progress bar) every N steps
    cd.eval_every = 0  # run the eval step over the eval batches every N steps (distill: distill.eval_split); 0 = never
    cd.tensorboard = True  # also write TensorBoard event files into tensorboard/ beside the run's metrics.jsonl
    cd.peak_flops = 0.0  # peak FLOP/s per device for MFU; 0 = measure a matmul in the model's compute dtype at start
    cd.progress = True  # show a tqdm progress bar (process 0)
    cd.steps_per_call = 0  # steps per compiled call (a scan); 0 = auto: up to 16 on CPU for runs >= 1000 steps, else 1
    return cd


def distill_config() -> ml_collections.ConfigDict:
    """Defaults of the `distill` config group (steps, batch and optimiser: `train`, `data`, `optim`)."""
    cd = ml_collections.ConfigDict()
    cd.loss = losses.default_config()  # CE + KD settings: alpha (0 = SFT baseline), divergence, tail_mode, ...
    cd.split = "distill"  # prepared split the student trains on
    cd.eval_split = "heldout"  # split scored every train.eval_every steps (eval_loss: NLL/token); no stage trains on it
    cd.keep_best = False  # final/ = the evaluated step of the lowest eval_loss (needs train.eval_every > 0)
    cd.white_box = ""  # Hugging Face folder of an open teacher: distil from its live logits; "" = use the store
    cd.output = ""  # run-dir subfolder for checkpoints; "" = student, or student_sft when loss.alpha == 0
    cd.seed = 1  # offset added to run.seed for the student's init and the sampled-tail draws
    return cd


def export_config() -> ml_collections.ConfigDict:
    """Defaults of the `export` config group."""
    cd = ml_collections.ConfigDict()
    cd.source = ""  # run-dir subfolder of the student to export; "" = distill's output for this config
    cd.step = 0  # checkpoint step to export; 0 = the newest
    cd.out = ""  # output folder; "" = <run>/export
    cd.max_shard_bytes = 5 * 10**9  # largest safetensors file; above it: several plus model.safetensors.index.json
    return cd
