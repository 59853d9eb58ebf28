"""Defaults of the `align` config group (read by align/rounds.py) and of its `lora` part (align/lora.py, which
re-exports them as `default_config`); no flax: config checks and `proxykd <stage> --help` read this module alone."""

import ml_collections


def default_config() -> ml_collections.ConfigDict:
    """Defaults of the `align` group. beta = 0.1 and the summed NLL + DPO loss follow the paper;
    the rest are documented choices for small proxies."""
    cd = ml_collections.ConfigDict()
    cd.seq_len = 0  # row length of (prompt + response) rows; 0 = data.seq_len
    cd.batch_size = 8  # global rows per step (pairs per step in DPO rounds)
    cd.sft_steps = 200  # warm-up SFT steps on the warm-up split (0 = skip the warm-up)
    cd.sft_lr = 1e-4  # peak learning rate of the warm-up (optim group supplies the schedule shape)
    cd.rounds = 2  # DPO rounds on the alignment split
    cd.dpo_steps_per_round = 0  # steps per round; 0 = one pass over the round's pairs
    cd.dpo_lr = 1e-5  # peak learning rate of every DPO round (optimizer state restarts each round)
    cd.prompts_per_round = 0  # alignment examples sampled per round (a fresh subset each round); 0 = all
    cd.samples_per_prompt = 1  # rejected responses sampled per example (each makes one pair)
    cd.beta = 0.1  # DPO temperature beta (paper value)
    cd.loss_type = "dpo"  # preference term: "dpo" (-log sigmoid, the paper's) or "ipo" (squared, Azar et al. 2023)
    cd.label_smoothing = 0.0  # conservative DPO (loss_type dpo): chance in [0, 0.5) that a pair's label is wrong
    cd.reference = "previous"  # DPO reference: "previous" (the proxy at each round's start) or "initial" (after SFT)
    cd.nll_weight = 1.0  # weight of NLL(chosen) added to the DPO loss (paper: 1, summed)
    cd.temperature = 1.0  # sampling temperature of rejected responses
    cd.top_p = 1.0  # nucleus top-p of rejected responses
    cd.max_new_tokens = 64  # longest rejected response (tokens, a final eos included)
    cd.sample_batch_size = 16  # prompts per generation call (fixed shape: compiled once)
    cd.logprob_chunk = 256  # tokens per vocabulary projection chunk in sequence log-probs
    cd.eval_batch_size = 16  # rows per forward in the reference and held-out passes
    cd.cut_rows = True  # each batch cut to its longest row (of seq_len, /2, /4, /8: at most 4 compiles per step)
    cd.heldout_samples = 64  # held-out split examples scored (NLL) after every phase; 0 = all
    cd.warmup_steps = 10  # linear LR warm-up of each phase (replaces optim.warmup_steps; capped below its updates)
    cd.checkpoint_every = 50  # steps between checkpoints within a phase
    cd.lora = lora_config()  # optional low-rank adapters (rank 0 = full fine-tuning)
    return cd


def lora_config() -> ml_collections.ConfigDict:
    """Defaults of `align.lora`."""
    cd = ml_collections.ConfigDict()
    cd.rank = 0  # adapter rank r; 0 = LoRA off (full fine-tuning of the proxy)
    cd.alpha = 16.0  # scale numerator: W_eff = W + alpha / rank * A @ B
    cd.targets = ("wq", "wk", "wv", "wo")  # weight names to adapt (any of wq wk wv wo w_gate w_up w_down)
    return cd
