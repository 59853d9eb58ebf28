"""The `align` stage: SFT warm-up of the proxy, then DPO rounds against its own samples.

Phases, each resumable and skipped once finished (markers in <run>/proxy/, see align/phases.py):
  sft        token-mean NLL of the teacher responses of the warm-up split;
  round r    on the alignment split: reference = the policy at the round's start (a frozen copy,
             saved with the round); one or more rejected responses per prompt sampled from it (KV
             cache, temperature/top-p); pairs whose sample equals the teacher response dropped;
             reference sequence log-probs computed once in their own jitted forward; then
             `dpo_steps_per_round` steps of nll_weight * NLL(chosen) + DPO(beta).
Every phase trains through the one train Loop (checkpoints, metrics, NaN stop, resume). The final
proxy (LoRA merged) is written as a Hugging Face folder to <run>/proxy/final/.
"""

from __future__ import annotations

import functools
import json
import logging
import pathlib

import jax
import ml_collections
import numpy as np

from proxykd_jax.align import lora as lora_lib
from proxykd_jax.align import objectives, phases
from proxykd_jax.align import pairs as pairs_lib
from proxykd_jax.errors import ProxyKDError
from proxykd_jax.stages.paths import RunPaths

log = logging.getLogger(__name__)


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
    cd.nll_weight = 1.0  # weight of NLL(chosen) added to the DPO loss (paper: 1, summed)
    cd.temperature = 1.0  # sampling temperature of rejected responses
    cd.top_p = 1.0  # nucleus top-p of rejected responses
    cd.max_new_tokens = 64  # longest rejected response (tokens, a final eos included)
    cd.sample_batch_size = 16  # prompts per generation call (fixed shape: compiled once)
    cd.logprob_chunk = 256  # tokens per vocabulary projection chunk in sequence log-probs
    cd.eval_batch_size = 16  # rows per forward in the reference and held-out passes
    cd.heldout_samples = 64  # held-out split examples scored (NLL) after every phase; 0 = all
    cd.warmup_steps = 10  # linear LR warm-up of each phase (replaces optim.warmup_steps; capped at steps - 1)
    cd.checkpoint_every = 50  # steps between checkpoints within a phase
    cd.lora = lora_lib.default_config()  # optional low-rank adapters (rank 0 = full fine-tuning)
    return cd


# ----------------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------------


def _seq_len(cfg) -> int:
    return int(cfg.align.seq_len or cfg.data.seq_len)


def load_examples(prepared_dir: pathlib.Path) -> tuple[dict[str, list], dict]:
    """{split: [Example]} for warmup/align/heldout, and the tokenizer block of the manifest."""
    from proxykd_jax.data.records import PreparedData

    try:
        data = PreparedData(prepared_dir)
    except FileNotFoundError as e:
        raise ProxyKDError(str(e)) from None
    out = {name: pairs_lib.examples_from_records(data.iter_split(name)) for name in ("warmup", "align", "heldout")}
    return out, dict(data.manifest["tokenizer"])


def make_trainable(model, lora_cfg, seed: int, mesh, rules):
    """(trainable module, frozen tuple): the proxy itself, or (adapters, (proxy,)) with LoRA."""
    if lora_cfg.rank <= 0:
        return model, ()
    from flax import nnx

    from proxykd_jax.parallel import sharding as sharding_lib

    adapters = sharding_lib.create_sharded_model(
        lora_lib.LoraAdapters,
        mesh,
        rules,
        model,
        rank=lora_cfg.rank,
        alpha=lora_cfg.alpha,
        targets=tuple(lora_cfg.targets),
        rngs=nnx.Rngs(params=seed + 1),
    )
    return adapters, (model,)


def make_sampler(trainable, frozen, acfg, stop_tokens, pad_id):
    """sample_fn(prompt_BxP, lengths_B, rng) -> (tokens_BxT, lengths_B) from the current policy."""
    from proxykd_jax.models.sampling import generate

    policy = objectives.policy_of(trainable, frozen)

    def sample_fn(prompt_BxP, lengths_B, rng):
        out = generate(
            policy,
            prompt_BxP,
            lengths_B,
            rng,
            max_new_tokens=acfg.max_new_tokens,
            temperature=acfg.temperature,
            top_p=acfg.top_p,
            stop_tokens=tuple(stop_tokens),
            pad_id=pad_id,
        )
        return out.tokens_BxT, out.lengths_B

    return sample_fn


# ----------------------------------------------------------------------------------------------
# Rounds
# ----------------------------------------------------------------------------------------------


def round_examples(examples: list, acfg, seed: int, round_index: int) -> list:
    """The round's alignment examples: all, or a fresh seeded subset of `prompts_per_round`."""
    if not acfg.prompts_per_round or acfg.prompts_per_round >= len(examples):
        return list(examples)
    rng = np.random.default_rng([seed, 7, round_index])
    idx = np.sort(rng.choice(len(examples), acfg.prompts_per_round, replace=False))
    return [examples[i] for i in idx]


def make_round_pairs(
    reference,
    frozen,
    examples: list,
    acfg,
    *,
    seed: int,
    round_index: int,
    seq_len: int,
    stop_tokens,
    pad_id: int,
    put_batch,
) -> tuple[dict[str, np.ndarray], int]:
    """Samples rejected responses from `reference`, builds pair rows, adds reference log-probs.

    Returns ({chosen_*, rejected_*, ref_chosen_logp, ref_rejected_logp}, dropped pairs)."""
    chosen = round_examples(examples, acfg, seed, round_index)
    width = max(len(e.prompt) for e in chosen)
    if width + acfg.max_new_tokens > reference_max_len(reference, frozen):
        raise ProxyKDError(
            f"prompts of up to {width} tokens + align.max_new_tokens={acfg.max_new_tokens} exceed "
            "the proxy's max_seq_len; lower align.max_new_tokens."
        )
    sample_fn = make_sampler(reference, frozen, acfg, stop_tokens, pad_id)
    rng = jax.random.fold_in(jax.random.key(seed), 1000 + round_index)
    samples = [[] for _ in chosen]
    for s in range(acfg.samples_per_prompt):
        out = pairs_lib.sample_responses(
            sample_fn,
            [e.prompt for e in chosen],
            jax.random.fold_in(rng, s),
            batch_size=acfg.sample_batch_size,
            width=width,
            pad_id=pad_id,
        )
        for i, response in enumerate(out):
            samples[i].append(response)
    pair_list, dropped = pairs_lib.build_pairs(chosen, samples)
    if not pair_list:
        raise ProxyKDError(
            f"align round {round_index}: every sampled response equalled the teacher's; raise "
            "align.temperature or align.samples_per_prompt."
        )
    rows = pairs_lib.pair_rows(pair_list, seq_len, pad_id)
    ref_c, ref_r = objectives.reference_logprobs(
        reference, frozen, rows, batch_size=acfg.eval_batch_size, chunk=acfg.logprob_chunk, put_batch=put_batch
    )
    rows["ref_chosen_logp"], rows["ref_rejected_logp"] = ref_c, ref_r
    return rows, dropped


def reference_max_len(trainable, frozen) -> int:
    model = frozen[0] if frozen else trainable
    return int(model.cfg.max_seq_len)


# ----------------------------------------------------------------------------------------------
# Phases through the train Loop
# ----------------------------------------------------------------------------------------------


def _phase_optimizer(cfg, lr: float, steps: int):
    from proxykd_jax.train import optim

    ocfg = ml_collections.ConfigDict(cfg.optim.to_dict())
    ocfg.lr = lr
    ocfg.warmup_steps = min(int(cfg.align.warmup_steps), max(steps - 1, 0))
    ocfg.decay_steps = 0
    return optim.make_optimizer(ocfg, steps), optim.make_schedule(ocfg, steps)


def train_phase(
    cfg,
    phase_dir: pathlib.Path,
    trainable,
    frozen,
    loss_fn,
    data_iter,
    *,
    steps: int,
    lr: float,
    rows_per_step: int,
    mesh,
    rules,
    step_cache: dict | None = None,
    cache_key=None,
):
    """Runs `steps` steps of `loss_fn` through the train Loop in `phase_dir` (resuming from its
    checkpoints); returns the trained module (a new module; `trainable` may be donated).

    With `step_cache`, the jitted step (and its optimizer) is built once per `cache_key` and reused
    by later phases with the same key (the DPO rounds), so it is traced and compiled once. MFU counts
    the step's own work: fwd + bwd of the policy on every row (reference log-probs are precomputed).
    """
    from flax import nnx

    from proxykd_jax.models.llama import flops_per_token
    from proxykd_jax.parallel import sharding as sharding_lib
    from proxykd_jax.train import metrics as metrics_lib
    from proxykd_jax.train.loop import Loop
    from proxykd_jax.train.step import make_train_step

    cached = step_cache.get(cache_key) if step_cache is not None else None
    if cached is None:
        optimizer, schedule = _phase_optimizer(cfg, lr, steps)
        graphdef, state, shardings = phases.train_state_from(trainable, optimizer, mesh, rules)
        step = make_train_step(
            loss_fn,
            graphdef,
            optimizer,
            state_shardings=shardings,
            batch_shardings=sharding_lib.batch_sharding(mesh, rules),
            frozen_shardings=tuple(sharding_lib.shardings_of(f) for f in frozen),
            schedule=schedule,
        )
        if step_cache is not None:
            step_cache[cache_key] = (optimizer, step)
    else:
        optimizer, step = cached
        graphdef, state, shardings = phases.train_state_from(trainable, optimizer, mesh, rules)
    seq_len = _seq_len(cfg)
    model_cfg = (frozen[0] if frozen else trainable).cfg
    flops = metrics_lib.step_flops(rows_per_step * seq_len, flops_per_token(model_cfg, seq_len, backward=True))
    tcfg = ml_collections.ConfigDict(cfg.train.to_dict())
    tcfg.steps, tcfg.batch_size, tcfg.seq_len = steps, rows_per_step, seq_len
    tcfg.checkpoint_every = cfg.align.checkpoint_every
    loop = Loop(
        tcfg,
        run_dir=phase_dir,
        mesh=mesh,
        rules=rules,
        train_step=step,
        state_shardings=shardings,
        flops_per_step=flops,
    )
    state = loop.run(state, data_iter, frozen=frozen)
    return nnx.merge(graphdef, state.params, state.rest)


def _summary(out_dir: pathlib.Path, record: dict) -> None:
    if jax.process_index() == 0:
        with open(out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")


def run(cfg, *, teacher_probs_fn=None, devices=None) -> dict:
    """Runs (or resumes) warm-up + DPO rounds; writes <run>/proxy/final/. Returns per-phase summaries.

    `teacher_probs_fn(tokens_BxL, segment_ids_BxL) -> probs_BxLxV` (known-teacher runs only) adds
    the held-out KL to the teacher before alignment and after every phase. `devices` (default: all)
    are the devices the mesh is laid over."""
    from proxykd_jax.eval.known_teacher import proxy_kl_to_teacher
    from proxykd_jax.parallel import make_mesh
    from proxykd_jax.parallel import sharding as sharding_lib

    acfg, paths = cfg.align, RunPaths.from_config(cfg)
    out = paths.proxy
    final_dir = out / "final"
    if (final_dir / "config.json").exists() and not cfg.run.overwrite:
        log.info("align: %s exists; nothing to do (set run.overwrite=True to redo)", final_dir)
        return {}
    out.mkdir(parents=True, exist_ok=True)
    mesh, rules = make_mesh(cfg.mesh, devices), cfg.mesh.rules
    seq_len, seed = _seq_len(cfg), int(cfg.run.seed)
    examples, tok = load_examples(paths.prepared)
    pad_id = int(tok.get("pad_id") if tok.get("pad_id") is not None else 0)
    stop_tokens = (int(tok["eos_id"]),) if tok.get("eos_id") is not None else ()
    put_batch = functools.partial(sharding_lib.global_batch, mesh=mesh, rules=rules)
    held = examples["heldout"][: acfg.heldout_samples or None]
    held_rows = pairs_lib.example_rows(held, seq_len, pad_id) if held else None

    model_cfg, proxy = phases.build_proxy(cfg.proxy, seed, mesh, rules)
    trainable, frozen = make_trainable(proxy, acfg.lora, seed, mesh, rules)
    summaries, step_cache = {}, {}

    def evaluate(name, extra):
        record = {"phase": name, **extra}
        if held_rows is not None:
            record["heldout_nll"] = objectives.heldout_nll(
                trainable,
                frozen,
                held_rows,
                batch_size=acfg.eval_batch_size,
                chunk=acfg.logprob_chunk,
                put_batch=put_batch,
            )
            if teacher_probs_fn is not None:
                policy = objectives.policy_of(trainable, frozen)
                record["kl_to_teacher"] = proxy_kl_to_teacher(
                    teacher_probs_fn, policy, held_rows, batch_size=acfg.eval_batch_size
                )
        log.info("align %s: %s", name, record)
        _summary(out, record)
        summaries[name] = record
        return record

    if not phases.is_done(out / "sft") and not (out / "sft" / "checkpoints").exists():
        evaluate("init", {})
    for name in phases.phase_names(acfg.rounds):
        phase_dir = out / name
        if phases.is_done(phase_dir):
            trainable = phases.restore_params(trainable, phase_dir / "params")
            log.info("align %s: finished earlier, parameters restored", name)
            continue
        phase_dir.mkdir(parents=True, exist_ok=True)
        extra = {}
        if name == "sft":
            if acfg.sft_steps > 0:
                if not examples["warmup"]:
                    raise ProxyKDError(
                        f"{paths.prepared}: the warmup split is empty; set align.sft_steps=0 or "
                        "give data.split.warmup a positive fraction."
                    )
                rows = pairs_lib.example_rows(examples["warmup"], seq_len, pad_id)
                loss_fn = functools.partial(objectives.sft_loss_fn, chunk=acfg.logprob_chunk)
                data_iter = phases.row_batches(rows, acfg.batch_size, seed)
                trainable = train_phase(
                    cfg,
                    phase_dir,
                    trainable,
                    frozen,
                    loss_fn,
                    data_iter,
                    steps=acfg.sft_steps,
                    lr=acfg.sft_lr,
                    rows_per_step=acfg.batch_size,
                    mesh=mesh,
                    rules=rules,
                )
        else:
            r = int(name.split("_")[1])
            if not examples["align"]:
                raise ProxyKDError(
                    f"{paths.prepared}: the align split is empty; set align.rounds=0 or give "
                    "data.split.align a positive fraction."
                )
            ref_path, pairs_path = phase_dir / "reference", phase_dir / "pairs.npz"
            if not ref_path.exists():
                phases.save_params(trainable, ref_path)
            reference = phases.restore_params(trainable, ref_path)
            if not pairs_path.exists():
                rows, dropped = make_round_pairs(
                    reference,
                    frozen,
                    examples["align"],
                    acfg,
                    seed=seed,
                    round_index=r,
                    seq_len=seq_len,
                    stop_tokens=stop_tokens,
                    pad_id=pad_id,
                    put_batch=put_batch,
                )
                if jax.process_index() == 0:
                    pairs_lib.save_pairs(pairs_path, rows, dropped)
            rows, dropped = pairs_lib.load_pairs(pairs_path)
            n_pairs = rows["chosen_tokens"].shape[0]
            steps = acfg.dpo_steps_per_round or max(n_pairs // acfg.batch_size, 1)
            loss_fn = functools.partial(
                objectives.dpo_loss_fn, beta=acfg.beta, nll_weight=acfg.nll_weight, chunk=acfg.logprob_chunk
            )
            data_iter = phases.pair_batches(rows, acfg.batch_size, seed + 1 + r)
            trainable = train_phase(
                cfg,
                phase_dir,
                trainable,
                frozen,
                loss_fn,
                data_iter,
                steps=steps,
                lr=acfg.dpo_lr,
                rows_per_step=2 * acfg.batch_size,
                mesh=mesh,
                rules=rules,
                step_cache=step_cache,
                cache_key=("dpo", steps),
            )
            extra = {"pairs": n_pairs, "dropped_equal": dropped, "steps": steps}
        phases.save_params(trainable, phase_dir / "params")
        record = evaluate(name, extra)
        phases.mark_done(phase_dir, record)
    export_final(trainable, frozen, model_cfg, final_dir, out, acfg, paths)
    return summaries


def export_final(trainable, frozen, model_cfg, final_dir, out, acfg, paths) -> None:
    """Writes the aligned proxy (LoRA merged) as a Hugging Face folder, and the adapters if any."""
    from proxykd_jax.models import hf

    policy = objectives.policy_of(trainable, frozen)
    tokenizer = None
    if paths.tokenizer.exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(paths.tokenizer))
    if jax.process_index() == 0:
        tmp = out / "final.tmp"
        hf.save_hf(policy, model_cfg, tmp, tokenizer=tokenizer)
        if frozen:
            lora_lib.save_adapters(trainable, out / "lora", targets=tuple(acfg.lora.targets))
        if final_dir.exists():
            import shutil

            shutil.rmtree(final_dir)
        tmp.replace(final_dir)
    log.info("align: aligned proxy written to %s", final_dir)
