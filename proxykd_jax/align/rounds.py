"""Proxy alignment: SFT warm-up of the proxy, then DPO rounds against its own samples.

Phases, each resumable and skipped once finished (markers in the output folder, see phases.py):
  sft        token-mean NLL of the teacher responses of the warm-up split;
  round r    on the alignment split: one or more rejected responses per prompt sampled from the
             policy at the round's start (a frozen copy, saved with the round; KV cache,
             temperature/top-p); pairs whose sample equals the teacher response dropped; reference
             sequence log-probs computed once in their own jitted forward, the reference being that
             same round-start policy (`align.reference = "previous"`) or the proxy after SFT
             ("initial"); then `dpo_steps_per_round` steps of nll_weight * NLL(chosen) + the
             preference term (`align.loss_type`: DPO(beta), conservative with
             `align.label_smoothing`, or IPO).
Every phase trains through the one train Loop (checkpoints, metrics, NaN stop, resume). The final
proxy (LoRA merged) is written as a Hugging Face folder to <out>/final/.

Every process holds all examples and the same pairs; the train batches are split over processes
by `phases.row_batches`, the evaluation and reference batches are placed whole
(`parallel.hosts.replicated_batch`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import pathlib

import jax
import ml_collections
import numpy as np

from proxykd_jax.align import lora as lora_lib
from proxykd_jax.align import objectives, phases
from proxykd_jax.align import pairs as pairs_lib
from proxykd_jax.errors import ProxyKDError
from proxykd_jax.parallel import hosts

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class AlignData:
    """The prepared splits the alignment reads, as examples, and the tokenizer's special ids."""

    warmup: list
    align: list
    heldout: list
    pad_id: int
    stop_tokens: tuple[int, ...]
    root: pathlib.Path
    vocab: int = 0  # the tokenizer's size: a padded proxy never samples the ids past it
    suppress_tokens: tuple[int, ...] = ()  # the tokenizer's special ids but the stop tokens: never sampled

    @classmethod
    def load(cls, prepared_dir: pathlib.Path) -> AlignData:
        from proxykd_jax.data.records import PreparedData

        try:
            data = PreparedData(prepared_dir)
        except FileNotFoundError as e:
            raise ProxyKDError(str(e)) from None
        splits = {n: pairs_lib.examples_from_records(data.iter_split(n)) for n in ("warmup", "align", "heldout")}
        tok = dict(data.manifest["tokenizer"])
        pad_id = int(tok.get("pad_id") if tok.get("pad_id") is not None else 0)
        # a rejected answer ends at the eos or at the chat template's end of turn (what chosen ones end with)
        stops = (tok.get("eos_id"), tok.get("end_of_turn_id"))
        stop_tokens = tuple(dict.fromkeys(int(t) for t in stops if t is not None))
        vocab = int(tok.get("vocab_size") or 0)
        # and holds no other special token of the run's tokenizer (pad, bos, unk, a template's headers), as eval's
        suppress = ()
        if (pathlib.Path(prepared_dir) / "tokenizer").is_dir():  # (written by the `prepare` stage)
            from proxykd_jax.models.tokenizer import load_tokenizer
            from proxykd_jax.teacher.token_bytes import special_ids

            suppress = tuple(sorted(special_ids(load_tokenizer(pathlib.Path(prepared_dir) / "tokenizer"))))
            suppress = tuple(t for t in suppress if t not in stop_tokens)
        return cls(
            **splits,
            pad_id=pad_id,
            stop_tokens=stop_tokens,
            root=pathlib.Path(prepared_dir),
            vocab=vocab,
            suppress_tokens=suppress,
        )


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


def make_sampler(trainable, frozen, acfg, stop_tokens, pad_id, vocab: int = 0, suppress_tokens=()):
    """sample_fn(prompt_BxP, lengths_B, rng) -> (tokens_BxT, lengths_B) from the current policy (over the
    tokenizer's first `vocab` ids: a padded embedding's are no token; 0 = all), never sampling `suppress_tokens`
    (the special tokens that are no stop token)."""
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
            suppress_tokens=tuple(suppress_tokens),
            pad_id=pad_id,
            vocab=vocab,
        )
        return out.tokens_BxT, out.lengths_B

    return sample_fn


def round_examples(examples: list, acfg, seed: int, round_index: int) -> list:
    """The round's alignment examples: all, or a fresh seeded subset of `prompts_per_round`."""
    if not acfg.prompts_per_round or acfg.prompts_per_round >= len(examples):
        return list(examples)
    rng = np.random.default_rng([seed, 7, round_index])
    idx = np.sort(rng.choice(len(examples), acfg.prompts_per_round, replace=False))
    return [examples[i] for i in idx]


def reference_max_len(trainable, frozen) -> int:
    model = frozen[0] if frozen else trainable
    return int(model.cfg.max_seq_len)


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
    logp_reference=None,
    vocab: int = 0,
    suppress_tokens=(),
) -> tuple[dict[str, np.ndarray], int]:
    """Samples rejected responses from `reference` (never `suppress_tokens`), builds pair rows, adds reference
    log-probs (of `logp_reference`, default `reference` itself; same `frozen`).

    Returns ({chosen_*, rejected_*, ref_chosen_logp, ref_rejected_logp}, dropped pairs)."""
    chosen = round_examples(examples, acfg, seed, round_index)
    width = max(len(e.prompt) for e in chosen)
    if width + acfg.max_new_tokens > reference_max_len(reference, frozen):
        raise ProxyKDError(
            f"prompts of up to {width} tokens + align.max_new_tokens={acfg.max_new_tokens} exceed "
            "the proxy's max_seq_len; lower align.max_new_tokens."
        )
    sample_fn = make_sampler(reference, frozen, acfg, stop_tokens, pad_id, vocab, suppress_tokens)
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
    pair_list, dropped = pairs_lib.build_pairs(chosen, samples, seq_len)
    if not pair_list:
        raise ProxyKDError(
            f"align round {round_index}: every sampled response equalled the teacher's; raise "
            "align.temperature or align.samples_per_prompt."
        )
    rows = pairs_lib.pair_rows(pair_list, seq_len, pad_id)
    ref_c, ref_r = objectives.reference_logprobs(
        reference if logp_reference is None else logp_reference,
        frozen,
        rows,
        batch_size=acfg.eval_batch_size,
        chunk=acfg.logprob_chunk,
        put_batch=put_batch,
        cut=acfg.cut_rows,
    )
    rows["ref_chosen_logp"], rows["ref_rejected_logp"] = ref_c, ref_r
    return rows, dropped


def _check_phase_steps(phase: str, steps: int, field: str, value: int, optim_cfg) -> None:
    """Refuses a phase that is no whole number of optimizer updates (`optim.check_whole_updates`); `field`
    (= `value`; 0: one pass over the round's pairs, which the caller rounds down to whole updates) sets its
    `steps`."""
    from proxykd_jax.train import optim

    setting = f"{field}={value}" + ("" if value else f": one pass over the round's pairs, {steps} steps")
    optim.check_whole_updates(
        steps, int(optim_cfg.grad_accum), setting=f"align phase {phase} ({setting})", field=field, model="proxy"
    )


def check_steps(acfg, optim_cfg) -> None:
    """The phases' step settings against `optim.grad_accum` (`_check_phase_steps`), before anything runs."""
    if acfg.sft_steps > 0:
        _check_phase_steps("sft", acfg.sft_steps, "align.sft_steps", acfg.sft_steps, optim_cfg)
    if acfg.rounds > 0 and acfg.dpo_steps_per_round > 0:
        steps = acfg.dpo_steps_per_round
        _check_phase_steps("round_000", steps, "align.dpo_steps_per_round", steps, optim_cfg)


def _phase_optimizer(optim_cfg, acfg, lr: float, steps: int):
    """(optimizer, schedule) of a `steps`-step phase: `align.warmup_steps` capped below the phase's
    steps // optim.grad_accum optimizer updates, the cosine decay over all of them."""
    from proxykd_jax.train import optim

    ocfg = ml_collections.ConfigDict(optim_cfg.to_dict())
    ocfg.lr = lr
    ocfg.warmup_steps = min(int(acfg.warmup_steps), max(steps // int(ocfg.grad_accum) - 1, 0))
    ocfg.decay_steps = 0
    return optim.make_optimizer(ocfg, steps), optim.make_schedule(ocfg, steps)


@dataclasses.dataclass
class PhaseTrainer:
    """Runs phases through the train Loop; the jitted DPO step is built once and reused by every
    round with the same number of steps (traced and compiled once)."""

    acfg: ml_collections.ConfigDict
    optim_cfg: ml_collections.ConfigDict
    train_cfg: ml_collections.ConfigDict
    mesh: object
    rules: tuple
    seq_len: int
    step_cache: dict = dataclasses.field(default_factory=dict)

    def train(
        self,
        phase_dir,
        trainable,
        frozen,
        loss_fn,
        data_iter,
        *,
        steps,
        lr,
        rows_per_step,
        cache_key=None,
        accum_weight=None,
    ):
        """Runs `steps` steps of `loss_fn` in `phase_dir` (resuming from its checkpoints); returns the
        trained module (a new module; `trainable` may be donated). Every `optim.grad_accum` steps make
        one optimizer update, the schedule's unit (`accum_weight`: the loss_fn metric its loss is a mean
        over, which weights the micro-batches; None: equal weights). MFU counts the step's own work: fwd + bwd of the
        policy on every row (reference log-probs are precomputed), without weight gradients for a
        LoRA-adapted frozen base (about 2x forward, the adapters' own FLOPs left out)."""
        from flax import nnx

        from proxykd_jax.data import pipeline
        from proxykd_jax.models.llama import flops_per_token
        from proxykd_jax.parallel import sharding as sharding_lib
        from proxykd_jax.train import metrics as metrics_lib
        from proxykd_jax.train.loop import Loop
        from proxykd_jax.train.step import make_train_step

        cached = self.step_cache.get(cache_key) if cache_key is not None else None
        if cached is None:
            optimizer, schedule = _phase_optimizer(self.optim_cfg, self.acfg, lr, steps)
            graphdef, state, shardings = phases.train_state_from(trainable, optimizer, self.mesh, self.rules)
            step = make_train_step(
                loss_fn,
                graphdef,
                optimizer,
                state_shardings=shardings,
                batch_shardings=sharding_lib.batch_sharding(self.mesh, self.rules),
                frozen_shardings=tuple(sharding_lib.shardings_of(f) for f in frozen),
                schedule=schedule,
                grad_accum=int(self.optim_cfg.grad_accum),
                accum_weight=accum_weight,
            )
            if cache_key is not None:
                self.step_cache[cache_key] = (optimizer, step)
        else:
            optimizer, step = cached
            graphdef, state, shardings = phases.train_state_from(trainable, optimizer, self.mesh, self.rules)
        model_cfg = (frozen[0] if frozen else trainable).cfg

        def flops(length: int) -> float:
            """A step's model FLOPs on rows of `length` positions."""
            if int(self.acfg.lora.rank) > 0:  # a frozen base: forward + input gradients, no weight gradients (`plan`)
                flops_tok = 2 * flops_per_token(model_cfg, length, backward=False)
            else:
                flops_tok = flops_per_token(model_cfg, length, backward=True)
            return metrics_lib.step_flops(rows_per_step * length, flops_tok)

        tcfg = ml_collections.ConfigDict(self.train_cfg.to_dict())
        tcfg.steps, tcfg.batch_size, tcfg.seq_len = steps, rows_per_step, self.seq_len
        tcfg.checkpoint_every = self.acfg.checkpoint_every
        loop = Loop(
            tcfg,
            run_dir=phase_dir,
            mesh=self.mesh,
            rules=self.rules,
            train_step=step,
            state_shardings=shardings,
            flops_per_step=flops,
            compute_dtype=model_cfg.dtype,
            row_lengths=pipeline.lengths_of(self.seq_len) if self.acfg.cut_rows else (),
        )
        state = loop.run(state, data_iter, frozen=frozen)
        return nnx.merge(graphdef, state.params, state.rest)


def align_proxy(
    proxy,
    data: AlignData,
    acfg,
    optim_cfg,
    train_cfg,
    *,
    out_dir: pathlib.Path,
    mesh,
    rules,
    seed: int,
    seq_len: int,
    sink,
    teacher_probs_fn=None,
) -> tuple[object, tuple, dict]:
    """Runs (or resumes) warm-up + DPO rounds of `proxy` in `out_dir`.

    Returns (trainable, frozen, per-phase summaries); `sink.append` receives each summary.
    `teacher_probs_fn(tokens_BxL, segment_ids_BxL) -> probs_BxLxV` (known-teacher runs only) adds
    the held-out KL to the teacher before alignment and after every phase."""
    from proxykd_jax.eval.known_teacher import proxy_kl_to_teacher

    check_steps(acfg, optim_cfg)
    put_batch = functools.partial(hosts.replicated_batch, mesh=mesh, rules=rules)
    held = data.heldout[: acfg.heldout_samples or None]
    held_rows = pairs_lib.example_rows(held, seq_len, data.pad_id) if held else None
    trainable, frozen = make_trainable(proxy, acfg.lora, seed, mesh, rules)
    trainer = PhaseTrainer(acfg, optim_cfg, train_cfg, mesh, rules, seq_len)
    summaries = {}

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
                cut=acfg.cut_rows,
            )
            if teacher_probs_fn is not None:
                policy = objectives.policy_of(trainable, frozen)
                record["kl_to_teacher"] = proxy_kl_to_teacher(
                    teacher_probs_fn, policy, held_rows, batch_size=acfg.eval_batch_size
                )
        log.info("align %s: %s", name, record)
        sink.append(record)
        summaries[name] = record
        return record

    if not phases.is_done(out_dir / "sft") and not (out_dir / "sft" / "checkpoints").exists():
        evaluate("init", {})
    for name in phases.phase_names(acfg.rounds):
        phase_dir = out_dir / name
        if phases.is_done(phase_dir):
            trainable = phases.restore_params(trainable, phase_dir / "params")
            log.info("align %s: finished earlier, parameters restored", name)
            continue
        phase_dir.mkdir(parents=True, exist_ok=True)
        extra = {}
        if name == "sft":
            if acfg.sft_steps > 0:
                if not data.warmup:
                    raise ProxyKDError(
                        f"{data.root}: the warmup split is empty; set align.sft_steps=0 or give "
                        "data.split.warmup a positive fraction."
                    )
                rows = pairs_lib.example_rows(data.warmup, seq_len, data.pad_id)
                loss_fn = functools.partial(objectives.sft_loss_fn, chunk=acfg.logprob_chunk)
                data_iter = phases.row_batches(rows, acfg.batch_size, seed, cut=acfg.cut_rows)
                trainable = trainer.train(
                    phase_dir,
                    trainable,
                    frozen,
                    loss_fn,
                    data_iter,
                    steps=acfg.sft_steps,
                    lr=acfg.sft_lr,
                    rows_per_step=acfg.batch_size,
                    accum_weight="response_tokens",  # a token mean: micro-batches count by their tokens
                )
        else:
            r = int(name.split("_")[1])
            rows, dropped = _round_pairs(trainable, frozen, data, acfg, phase_dir, r, seed, seq_len, put_batch)
            n_pairs = rows["chosen_tokens"].shape[0]
            steps = acfg.dpo_steps_per_round or max(n_pairs // acfg.batch_size, 1)
            if not acfg.dpo_steps_per_round and steps >= optim_cfg.grad_accum:  # one pass: whole updates only
                steps -= steps % int(optim_cfg.grad_accum)
            _check_phase_steps(name, steps, "align.dpo_steps_per_round", acfg.dpo_steps_per_round, optim_cfg)
            loss_fn = functools.partial(
                objectives.dpo_loss_fn,
                beta=acfg.beta,
                nll_weight=acfg.nll_weight,
                chunk=acfg.logprob_chunk,
                loss_type=str(acfg.get("loss_type", "dpo")),
                label_smoothing=float(acfg.get("label_smoothing", 0.0)),
            )
            trainable = trainer.train(
                phase_dir,
                trainable,
                frozen,
                loss_fn,
                round_batches(rows, acfg.batch_size, seed + 1 + r, int(optim_cfg.grad_accum), cut=acfg.cut_rows),
                steps=steps,
                lr=acfg.dpo_lr,
                rows_per_step=2 * acfg.batch_size,
                cache_key=("dpo", steps),
            )  # no accum_weight: micro-batches of as many pairs weigh equally (the NLL term: `round_batches`)
            extra = {"pairs": n_pairs, "dropped_equal": dropped, "steps": steps}
        phases.save_params(trainable, phase_dir / "params")
        record = evaluate(name, extra)
        phases.mark_done(phase_dir, record)
    return trainable, frozen, summaries


def round_batches(rows: dict[str, np.ndarray], pairs_per_batch: int, seed: int, grad_accum: int, *, cut: bool = False):
    """A round's pair batches (`phases.pair_batches`); with grad_accum > 1 micro-batches, each carries its update's
    chosen token count (`objectives.UpdateTokenBatches`): the update is one step on the update's pairs at once."""
    batches = phases.pair_batches(rows, pairs_per_batch, seed, cut=cut)
    return objectives.UpdateTokenBatches(batches, grad_accum) if grad_accum > 1 else batches


def _round_pairs(trainable, frozen, data: AlignData, acfg, phase_dir, r, seed, seq_len, put_batch):
    """The round's pairs: from `pairs.npz` when a killed run saved them, else sampled now."""
    if not data.align:
        raise ProxyKDError(
            f"{data.root}: the align split is empty; set align.rounds=0 or give data.split.align a positive fraction."
        )
    ref_path, pairs_path = phase_dir / "reference", phase_dir / "pairs.npz"
    if not ref_path.exists():
        phases.save_params(trainable, ref_path)
    reference = phases.restore_params(trainable, ref_path)
    if not pairs_path.exists():
        logp_reference = None  # "previous": the round-start policy both samples and scores
        if str(acfg.get("reference", "previous")) == "initial":
            logp_reference = phases.restore_params(trainable, phase_dir.parent / "sft" / "params")
        rows, dropped = make_round_pairs(
            reference,
            frozen,
            data.align,
            acfg,
            seed=seed,
            round_index=r,
            seq_len=seq_len,
            stop_tokens=data.stop_tokens,
            pad_id=data.pad_id,
            put_batch=put_batch,
            logp_reference=logp_reference,
            vocab=data.vocab,
            suppress_tokens=data.suppress_tokens,
        )
        if jax.process_index() == 0:
            pairs_lib.save_pairs(pairs_path, rows, dropped)
        hosts.sync(f"align: {phase_dir.name} pairs saved")
    return pairs_lib.load_pairs(pairs_path)


def export_final(
    trainable, frozen, model_cfg, final_dir: pathlib.Path, lora_targets, mesh, tokenizer=None, stop_ids=(), source=None
) -> None:
    """Writes the aligned proxy (LoRA merged) as a Hugging Face folder (`final_dir`, written beside
    and renamed into place), and the adapters beside it (`lora/`) when there are any. Its eos_token_id lists,
    besides the tokenizer's eos, `stop_ids` (those of the folder the proxy started from) and the end of turn of
    the run's tokenizer (`end_of_turn_id`, the prepared manifest's: what its templated answers end with); its
    config.json is `source`'s, the folder the proxy started from, where that describes it (`hf.source_config`)."""
    import shutil

    from flax import nnx

    from proxykd_jax.models import hf
    from proxykd_jax.models.tokenizer import end_of_turn_id

    stops = hf.answer_stop_ids(stop_ids, end_of_turn_id(tokenizer) if tokenizer is not None else None)

    tmp = final_dir.with_name(final_dir.name + ".tmp")
    if jax.process_index() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    hosts.sync("align: final.tmp cleared")
    # The merged policy stays sharded: save_hf brings one tensor at a time to the host (collectively,
    # when it spans processes) and process 0 writes. Only the (small) adapters are replicated.
    policy = objectives.policy_of(trainable, frozen)
    hf.save_hf(policy, model_cfg, tmp, tokenizer=tokenizer, stop_ids=stops, source=source)
    adapters = hosts.replicate(nnx.split(trainable)[1], mesh) if frozen else None
    if jax.process_index() == 0:
        if frozen:
            lora_lib.save_adapters(
                nnx.merge(nnx.split(trainable)[0], adapters), final_dir.parent / "lora", targets=tuple(lora_targets)
            )
        shutil.rmtree(final_dir, ignore_errors=True)
        tmp.replace(final_dir)
    hosts.sync("align: final written")
    log.info("align: aligned proxy written to %s", final_dir)
