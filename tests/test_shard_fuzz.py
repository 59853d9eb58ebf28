"""Sharded steps fuzzed against one device: random meshes over the 8 simulated devices (every (data, fsdp, tensor)
factorisation, axes of size 1 included), random tiny models (grouped key/value heads, odd head-dim multiples,
scanned or unrolled layers, sliding windows, tied embeddings, LoRA) and random packed batches.

A case either runs and gives one device's numbers with its parameters and optimizer moments laid out as the rules
say, or is refused with a one-sentence `ConfigError` naming the config field, raised before the model's first
program (a batch the batch shards do not split: before the step's). The steps: the forward logits, the distill
train step (SFT, alpha = 0, and sparse KD from a random store batch), the align DPO step with full fine-tuning and
with LoRA adapters on a frozen base, two optimizer steps each. Tolerance (`compare`): 1e-4 of each value's scale;
the steps themselves agree to about 1e-6, but the second step runs at parameters that already differ by float32
reduction order, and a tiny model (head_dim 2, q/k norms) turned 6e-7 in the parameters into 2.2e-5 in the second
gradient norm (the one-device step at the 8-device parameters gave the 8-device norm exactly). `run_steps` and
the generators are what the /tmp fuzz runs drove over many more cases; the tests below keep a seeded subset.
"""

from __future__ import annotations

import ast
import functools
import itertools
import math
import re

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx
from parallel_helpers import mesh_cfg, optim_cfg

from proxykd_jax import compiled_steps, losses
from proxykd_jax.align import lora, objectives
from proxykd_jax.align.phases import train_state_from
from proxykd_jax.config import base_config
from proxykd_jax.errors import ConfigError
from proxykd_jax.models.llama import Llama, ModelConfig
from proxykd_jax.parallel import (
    LOGICAL_RULES,
    batch_sharding,
    create_sharded_model,
    global_batch,
    make_mesh,
    shardings_of,
    under_mesh,
)
from proxykd_jax.parallel.rules import normalize_rules
from proxykd_jax.train import create_train_state, distill, make_optimizer, make_train_step

# every (data, fsdp, tensor) whose product is 8
MESHES = tuple(s for s in itertools.product((1, 2, 4, 8), repeat=3) if math.prod(s) == 8)
K = 4  # store entries per token
LORA_TARGETS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
# the model field each logical axis of the decoder's parameters comes from
FIELD_OF_AXIS = {
    "vocab": "vocab_size",
    "embed": "d_model",
    "mlp": "d_ff",
    "heads": "num_heads",
    "kv_heads": "num_kv_heads",
}


def random_model(rng: np.random.Generator, shape: tuple[int, int, int], fit: float = 0.7) -> ModelConfig:
    """A tiny random decoder; with probability `fit` each dimension a sharded axis splits is a multiple of it."""
    _, fsdp, tensor = shape

    def pick(options, ways):
        fitting = [o for o in options if o % ways == 0]
        return int(rng.choice(fitting if fitting and rng.random() < fit else options))

    kv = pick((1, 2, 3, 4), tensor)
    heads = kv * pick((1, 2, 3), 1)
    if heads % tensor and rng.random() < fit:  # the query heads a multiple of both
        heads = kv * (tensor // math.gcd(kv, tensor))
    layers = int(rng.integers(1, 4))
    window, layer_types = None, None
    if rng.random() < 0.5:
        window = int(rng.integers(2, 6))
        if rng.random() < 0.5:
            layer_types = tuple(rng.choice(("sliding_attention", "full_attention"), layers).tolist())
    norm = rng.choice(("qk_norm", "qkv_bias") if layer_types else ("none", "qk_norm", "qkv_bias"))  # as Qwen2 / 3
    return ModelConfig(
        vocab_size=pick((24, 40, 48, 50, 64), tensor),
        d_model=pick((6, 8, 12, 16, 20, 32), fsdp),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=int(rng.choice((2, 6, 8, 10))),
        d_ff=pick((12, 16, 20, 24, 48), tensor),
        tie_embeddings=bool(rng.random() < 0.5),
        scan_layers=bool(rng.random() < 0.5),
        qk_norm=norm == "qk_norm",
        qkv_bias=norm == "qkv_bias",
        sliding_window=window,
        layer_types=layer_types,
        max_seq_len=64,
    )


def random_batch(rng: np.random.Generator, rows: int, length: int, vocab: int) -> dict[str, np.ndarray]:
    """Packed rows (2 or 3 samples, a padding tail on some) with a random sparse store entry per token."""
    seq = rng.integers(0, vocab, (rows, length + 1)).astype(np.int32)
    segment_ids = np.ones((rows, length), np.int32)
    positions = np.zeros((rows, length), np.int32)
    for r in range(rows):
        cuts = np.sort(rng.choice(np.arange(1, length), size=int(rng.integers(1, 3)), replace=False))
        for s, cut in enumerate(cuts):
            segment_ids[r, cut:] = s + 2
        if rng.random() < 0.5:
            segment_ids[r, length - int(rng.integers(1, length // 2)) :] = 0
        for t in range(1, length):
            same = segment_ids[r, t] == segment_ids[r, t - 1]
            positions[r, t] = positions[r, t - 1] + 1 if same else 0
    probs = rng.dirichlet(np.ones(K + 1) * 0.5, size=(rows, length))
    kd_logprobs = np.log(probs[..., :K]).astype(np.float32)
    return dict(
        tokens=seq[:, :-1],
        targets=seq[:, 1:],
        positions=positions,
        segment_ids=segment_ids,
        loss_mask=((rng.random((rows, length)) < 0.8) & (segment_ids > 0)).astype(np.float32),
        sample_ids=np.where(segment_ids > 0, segment_ids + 100 * np.arange(rows)[:, None], 0).astype(np.int32),
        kd_ids=np.stack([rng.permutation(vocab)[:K] for _ in range(rows * length)]).reshape(rows, length, K),
        kd_logprobs=kd_logprobs,
        kd_tail=(1.0 - np.exp(kd_logprobs.astype(np.float64)).sum(-1)).astype(np.float32),
        weight=rng.uniform(0.2, 1.0, (rows, length)).astype(np.float32),
        ref_logp=rng.normal(-30.0, 5.0, rows).astype(np.float32),
    )


def refusal(cfg: ModelConfig, shape: tuple[int, int, int], rows: int, rules=LOGICAL_RULES) -> tuple[str, ...]:
    """The logical axes a case may be refused on (the parameters' that their mesh axes do not split, else "batch"
    where the rows do not split), () where everything splits."""
    table = dict(normalize_rules(rules))
    sizes = dict(zip(("data", "fsdp", "tensor"), shape))
    ways = {axis: math.prod(sizes[a] for a in table[axis]) for axis in (*FIELD_OF_AXIS, "batch")}
    params = tuple(axis for axis, field in FIELD_OF_AXIS.items() if getattr(cfg, field) % ways[axis])
    return params or (("batch",) if rows % ways["batch"] else ())


def _optimizer():
    """AdamW with eps 1e-3: with the default 1e-8 an update is about lr * sign(g) wherever |g| is near 1e-8, so
    float32 reduction-order noise on a gradient that is zero in exact arithmetic (a key bias's, which shifts every
    score of a query alike) moved parameters by up to lr differently on two meshes; eps 1e-3 bounds the update's
    sensitivity to the gradient by lr / eps."""
    return make_optimizer(optim_cfg(eps=1e-3), total_steps=10)


def _loss_cfg(alpha: float, tail_mode: str) -> ml_collections.ConfigDict:
    cfg = losses.default_config()
    cfg.update(alpha=alpha, tail_mode=tail_mode, num_samples=4, chunk_size=24)  # several tiles, the last padded
    return cfg


def _copy(state):
    """A copy of a (sharded) train state with fresh buffers, so that a step may donate it (no program compiled)."""
    return jax.device_put(state, may_alias=False)


def _check_layout(tree, shardings, where: str) -> None:
    """Each array of `tree` laid out as `shardings` says (shards no larger: nothing replicated that is split)."""
    for (path, x), s in zip(jax.tree_util.tree_flatten_with_path(tree)[0], jax.tree.leaves(shardings)):
        got, want = x.sharding.shard_shape(x.shape), s.shard_shape(x.shape)
        assert got == want, f"{where}{jax.tree_util.keystr(path)}: shards {got}, the rules' {want}"


def _train(name, step, state, shardings, batch, frozen=()) -> dict[str, np.ndarray]:
    """Metrics of two optimizer steps and the parameters after them, {name/...: value}; checks their layout."""
    out = {}
    for i in range(2):
        state, metrics = step(state, batch, *frozen)
        out.update({f"{name}/{k}@{i}": np.asarray(v) for k, v in metrics.items()})
    _check_layout(state.params, shardings.params, f"{name} params")
    _check_layout(state.opt_state, shardings.opt_state, f"{name} optimizer")
    flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
    return out | {f"{name}/params{jax.tree_util.keystr(p)}": np.asarray(v) for p, v in flat}


STEPS = ("forward", "sft", "kd", "dpo", "lora")


def run_steps(cfg, mesh, host: dict, *, rules=LOGICAL_RULES, tail_mode="tail", steps=STEPS, seed: int = 0) -> dict:
    """`steps` of the case on `mesh`: {name: numpy value} (the logits; each train step's metrics and parameters
    after two optimizer steps). Checks on the way that the logits' rows, the parameters and the optimizer moments
    are split as the rules say."""
    optimizer = _optimizer()
    graphdef, state, sh = create_train_state(optimizer, mesh, rules, Llama, cfg, rngs=nnx.Rngs(seed))
    batch = global_batch(host, mesh, rules)
    shardings = dict(state_shardings=sh, batch_shardings=batch_sharding(mesh, rules))
    out = {}
    if "forward" in steps:

        def forward(s, b):
            return s.model(graphdef)(b["tokens"], b["positions"], b["segment_ids"])

        logits = under_mesh(jax.jit(forward), mesh, rules)(state, batch)
        row_shard = batch_sharding(mesh, rules).shard_shape(logits.shape[:1])[0]
        assert logits.sharding.shard_shape(logits.shape)[0] <= row_shard, logits.sharding  # rows not gathered
        out["logits"] = np.asarray(logits)
    for name, alpha in (("sft", 0.0), ("kd", 1.0)):
        if name in steps:
            loss_fn = distill.make_loss_fn(_loss_cfg(alpha, tail_mode), seed=seed)
            out |= _train(name, make_train_step(loss_fn, graphdef, optimizer, **shardings), _copy(state), sh, batch)
    dpo_batch = {k: batch[k] for k in ("tokens", "targets", "segment_ids", "loss_mask", "ref_logp")}
    dpo = functools.partial(objectives.dpo_loss_fn, beta=0.5, nll_weight=0.3, chunk=24)
    if "dpo" in steps:
        out |= _train("dpo", make_train_step(dpo, graphdef, optimizer, **shardings), _copy(state), sh, dpo_batch)
    if "lora" in steps:  # adapters trained on the frozen base, DPO
        base = state.model(graphdef)
        adapters = create_sharded_model(lora.LoraAdapters, mesh, rules, base, rank=2, alpha=4.0,
                                        targets=LORA_TARGETS, rngs=nnx.Rngs(params=seed + 1))  # fmt: skip
        lora_graphdef, lora_state, lora_sh = train_state_from(adapters, optimizer, mesh, rules)
        step = make_train_step(dpo, lora_graphdef, optimizer, state_shardings=lora_sh,
                               batch_shardings=shardings["batch_shardings"], frozen_shardings=(shardings_of(base),))  # fmt: skip
        out |= _train("lora", step, lora_state, lora_sh, dpo_batch, frozen=(base,))
    return out


def compare(got: dict, want: dict, rtol: float = 1e-4) -> tuple[float, str]:
    """Asserts every value of `got` is `want`'s within float32 reduction order: |got - want| <= rtol * scale,
    scale the largest |want| of that value (and at least 1). Returns the largest such relative difference and
    the value's name."""
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
    worst = (0.0, "")
    for key, ref in want.items():
        ref, val = np.asarray(ref, np.float64), np.asarray(got[key], np.float64)
        assert np.isfinite(ref).all() and np.isfinite(val).all(), key
        diff = float(np.max(np.abs(val - ref), initial=0.0)) / max(float(np.max(np.abs(ref), initial=0.0)), 1.0)
        assert diff <= rtol, f"{key}: relative difference {diff:.2e} > {rtol:.0e}"
        worst = max(worst, (diff, key))
    return worst


def check_refused(err: ConfigError, expected: tuple[str, ...]) -> str:
    """A refusal is one sentence naming one of the `expected` axes and the config fields to change; returns the
    axis it names."""
    message = str(err)
    assert "\n" not in message and message.endswith(".") and not re.search(r"\.\s+[A-Z]", message), message
    if expected == ("batch",):
        assert "batch_size" in message and "multiple of" in message, message
        return "batch"
    axis = re.match(r"parameter \S+ dim \d+ \('(\w+)', size \d+\) does not split", message).group(1)
    assert axis in expected, (axis, expected, message)
    assert "mesh.shape" in message and "mesh.rules" in message and f"the model's {FIELD_OF_AXIS[axis]}" in message
    return axis


def offered_rules(err: ConfigError):
    """The rules a refusal offers (`--config.mesh.rules="..."`): the refused axis kept whole."""
    return ast.literal_eval(re.search(r'--config.mesh.rules="(.*?)"', str(err)).group(1))


class Lowered:
    """The names of the programs jax lowers while it is entered (the persistent cache does not skip lowering)."""

    def __enter__(self):
        self.names, self.on = [], True
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def _listen(self, event, duration, **kw):
        if self.on and event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
            self.names.append(kw.get("fun_name", ""))

    def __exit__(self, *exc):
        self.on = False
        jax.monitoring.unregister_event_duration_listener(self._listen)


def run_or_refuse(cfg, shape, host, *, rules=LOGICAL_RULES, tail_mode="tail", steps=STEPS):
    """`run_steps` on the mesh `shape`, or the checked refusal: (results or None, the refused axis or None)."""
    mesh = make_mesh(mesh_cfg(*shape))
    expected = refusal(cfg, shape, host["tokens"].shape[0], rules)
    if not expected:
        return run_steps(cfg, mesh, host, rules=rules, tail_mode=tail_mode, steps=steps), None
    with Lowered() as lowered, pytest.raises(ConfigError) as err:
        run_steps(cfg, mesh, host, rules=rules, tail_mode=tail_mode, steps=steps)
    axis = check_refused(err.value, expected)
    if axis != "batch":  # refused when laying out the parameters: before the model's first program
        assert not any(n in ("init", "build") for n in lowered.names), lowered.names
    return err.value, axis


def one_device(cfg, host, tail_mode="tail", steps=STEPS):
    return run_steps(cfg, make_mesh(mesh_cfg(), jax.devices()[:1]), host, tail_mode=tail_mode, steps=steps)


# ----------------------------------------------------------------------------------------------
# The committed subset: few distinct shapes (compiles dominate); the /tmp fuzz runs cover the rest
# ----------------------------------------------------------------------------------------------

# 2 key/value heads under 6 query heads (3 per group), head_dim 6 (2 x 3), scanned sliding and full layers (a
# traced window), Qwen3's q/k norms, tied embeddings; on data x fsdp x tensor = 2 x 2 x 2
AWKWARD = ModelConfig(vocab_size=48, d_model=16, num_layers=2, num_heads=6, num_kv_heads=2, head_dim=6, d_ff=24,
                      tie_embeddings=True, scan_layers=True, sliding_window=3, qk_norm=True,
                      layer_types=("sliding_attention", "full_attention"), max_seq_len=64)  # fmt: skip


def test_every_step_on_a_2x2x2_mesh_equals_one_device():
    host = random_batch(np.random.default_rng(), rows=8, length=12, vocab=AWKWARD.vocab_size)
    want = one_device(AWKWARD, host, tail_mode="sampled")
    assert np.std(want["logits"]) > 0.1 and want["kd/kd@0"] > 0 and want["lora/dpo/margin@1"] != 0
    got, refused = run_or_refuse(AWKWARD, (2, 2, 2), host, tail_mode="sampled")
    assert refused is None, got
    compare(got, want)


@pytest.mark.parametrize(
    "shape",
    [dict(data=3, fsdp=1, tensor=1), dict(data=2, fsdp=2, tensor=1), dict(data=3, fsdp=-1, tensor=1),
     dict(data=-1, fsdp=-1, tensor=8), dict(data=0, fsdp=8, tensor=1), dict(data=1, fsdp=8, pipeline=1),
     dict(data="two", fsdp=4, tensor=1), dict(data=1, fsdp=2.5, tensor=1)],
)  # fmt: skip
def test_a_mesh_shape_the_devices_cannot_take_is_a_config_error(shape):
    """(These were ValueErrors, which the CLI prints with a traceback, as a bug.)"""
    with pytest.raises(ConfigError, match=r"change mesh\.shape\.$|the axes are") as err:
        make_mesh(ml_collections.ConfigDict({"shape": shape}))
    assert "\n" not in str(err.value) and not re.search(r"\.\s+[A-Z]", str(err.value))


def test_random_cases_on_random_meshes_refuse_before_compiling():
    """Seeded random models over every mesh: one that does not fit is refused in one sentence naming an axis that
    does not split, before the model's first program; the rules the refusal offers keep that axis whole and lead
    to the next refusal, until the parameters fit (no step is compiled here)."""
    rng = np.random.default_rng(20)
    refused = set()
    optimizer = _optimizer()
    for shape in MESHES:
        mesh = make_mesh(mesh_cfg(*shape))
        for _ in range(5):
            cfg = random_model(rng, shape, fit=0.3)
            rules, expected = LOGICAL_RULES, refusal(cfg, shape, rows=8)
            with Lowered() as lowered:
                while expected and expected != ("batch",):
                    with pytest.raises(ConfigError) as err:
                        create_train_state(optimizer, mesh, rules, Llama, cfg, rngs=nnx.Rngs(0))
                    axis = check_refused(err.value, expected)
                    refused.add(axis)
                    rules = offered_rules(err.value)
                    assert dict(normalize_rules(rules))[axis] == ()
                    expected = refusal(cfg, shape, 8, rules)
            assert not any(n in ("init", "build") for n in lowered.names), lowered.names
    assert refused == set(FIELD_OF_AXIS), refused


def test_the_offered_rules_run_and_equal_one_device():
    """2 key/value heads over tensor=4: refused, then run with the rules the refusal offers (the key/value heads
    whole on every device, the query heads still split), equal to one device."""
    cfg = ModelConfig(vocab_size=32, d_model=16, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=6, d_ff=16,
                      scan_layers=False, max_seq_len=64)  # fmt: skip
    shape = (1, 2, 4)
    host = random_batch(np.random.default_rng(), rows=4, length=8, vocab=cfg.vocab_size)
    err, axis = run_or_refuse(cfg, shape, host)
    assert axis == "kv_heads"
    got, refused = run_or_refuse(cfg, shape, host, rules=offered_rules(err), steps=("forward", "kd"))
    assert refused is None
    compare(got, one_device(cfg, host, steps=("forward", "kd")))


@pytest.mark.parametrize(
    "step, field, rows, shape, message",
    [
        ("distill", "train.batch_size", 2, (1, 4, 2), "make train.batch_size a multiple of 4"),
        ("dpo_lora", "align.batch_size", 2, (2, 4, 1), "make align.batch_size a multiple of 4"),
        ("eval", "eval.batch_size", 12, (8, 1, 1), "make eval.batch_size a multiple of 8"),
    ],
)
def test_plan_refuses_rows_the_batch_shards_do_not_split_before_lowering(step, field, rows, shape, message):
    """`compiled_steps.plan_steps` (what `proxykd plan` compiles) lowered such a step and raised jax's
    IndivisibleError from inside the lowering."""
    cfg = base_config()
    for group in (cfg.model, cfg.proxy):
        group.update(vocab_size=48, d_model=16, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=6, d_ff=24)
    cfg.train.seq_len = cfg.align.seq_len = cfg.data.seq_len = 16
    cfg.align.lora.rank = 2
    group, name = field.split(".")
    cfg[group][name] = rows
    pattern = (
        rf"^the {step} step's {rows * (2 if step.startswith('dpo') else 1)} rows \((2 x )?{field}\) .*{message}\.$"
    )
    with Lowered() as lowered, pytest.raises(ConfigError, match=pattern):
        compiled_steps.plan_steps(cfg, make_mesh(mesh_cfg(*shape)), (step,))
    assert lowered.names == [], lowered.names
