"""The stages' batch steps compiled ahead of time on abstract sharded inputs, nothing allocated: each step's
memory and FLOPs per device (`StepPlan`).

`plan_steps` makes every input of each step in `batch_steps.STEPS` (the distillation train step, the alignment SFT
and DPO train steps with full fine-tuning and LoRA, the posterior step, the eval forward) a `jax.ShapeDtypeStruct`
carrying its `NamedSharding` on the mesh it is given, lowers and compiles the step at the batch its stage runs
(`batch_steps.row_shape`), and reads the compiled program's `memory_analysis()` and `cost_analysis()`; the FLOPs
are the model's own count (`models.llama.flops_per_token`). `extrapolate` reads bytes and FLOPs at full depth off
the line through two compiled depths. `proxykd plan` (`plan.py`) checks the config, builds the mesh over simulated
devices and prints these figures as its table.
"""

from __future__ import annotations

import dataclasses
import logging
import math

from proxykd_jax.batch_steps import STEPS, model_group, row_shape
from proxykd_jax.errors import ConfigError

log = logging.getLogger("proxykd_jax.plan")  # the `proxykd plan` command's log: its compile lines keep its name


@dataclasses.dataclass
class StepPlan:
    name: str
    layers: int
    argument_bytes: float
    output_bytes: float
    temp_bytes: float
    alias_bytes: float
    hlo_flops: float  # XLA's count: a scanned layer stack counts one layer
    model_flops: float  # per device, per step
    rows: int = 0  # sequences per step (global batch)
    seq_len: int = 0  # tokens per sequence

    @property
    def total_bytes(self) -> float:
        """Live bytes per device at the step's peak: arguments + outputs not aliased to them + temporaries."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


def _abstract(tree, shardings):
    import jax

    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _abstract_module(make, mesh, rules):
    """(graphdef, abstract state with shardings) of the module `make()` builds; nothing allocated."""
    from flax import nnx

    from proxykd_jax.parallel.sharding import state_shardings

    graphdef, state = nnx.split(nnx.eval_shape(make))
    return graphdef, _abstract(state, state_shardings(state, mesh, rules))


def _abstract_train_state(make, optimizer, mesh, rules):
    import jax
    from flax import nnx

    from proxykd_jax.train.state import TrainState, train_state_shardings

    graphdef, state = nnx.split(nnx.eval_shape(make))
    params, rest = nnx.split_state(state, nnx.Param, ...)
    sh = train_state_shardings(params, rest, optimizer, mesh, rules)
    opt = jax.eval_shape(optimizer.init, params)
    step = jax.ShapeDtypeStruct((), "int32")
    tree = TrainState(step=step, params=params, rest=rest, opt_state=opt)
    return graphdef, _abstract(tree, sh), sh


def _batch(fields: dict, mesh, rules):
    import jax

    from proxykd_jax.parallel.sharding import batch_sharding

    sh = batch_sharding(mesh, rules)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sh) for k, (shape, dtype) in fields.items()}


def _check_rows(name: str, rows: int, field: str, mesh, rules) -> None:
    """Refuses, before anything is lowered, a step whose `rows` (from config `field`) the mesh's batch shards do
    not split: jax would raise its own IndivisibleError from inside the lowering."""
    from proxykd_jax.parallel.sharding import batch_sharding, spec_axes, spec_ways

    entry = batch_sharding(mesh, rules).spec[0]
    axes, ways = spec_axes(entry), spec_ways(entry, mesh)
    if rows % ways:
        per = 2 if field.startswith("2 x ") else 1  # a DPO pair is two rows
        raise ConfigError(
            f"the {name} step's {rows} rows ({field}) do not split over the mesh's {ways} batch shards "
            f"({' x '.join(f'{a}={mesh.shape[a]}' for a in axes)}); make {field.removeprefix('2 x ')} a multiple of "
            f"{ways // math.gcd(ways, per)}."
        )


def _rows(b, length, *names, dtype="int32"):
    return {n: ((b, length), dtype) for n in names}


def _measure(name, compiled, layers, model_flops, n_devices) -> StepPlan:
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, list):  # older jax returns one dict per program
        cost = cost[0] if cost else {}
    return StepPlan(
        name=name,
        layers=layers,
        argument_bytes=float(mem.argument_size_in_bytes),
        output_bytes=float(mem.output_size_in_bytes),
        temp_bytes=float(mem.temp_size_in_bytes),
        alias_bytes=float(mem.alias_size_in_bytes),
        hlo_flops=float((cost or {}).get("flops", float("nan"))),
        model_flops=model_flops / n_devices,
    )


def _maker(cls, mc):
    from flax import nnx

    return lambda: cls(mc, rngs=nnx.Rngs(0))


def _adapters_maker(llama_cls, lora, mc, rank, alpha, targets):
    from flax import nnx

    def make():
        base = llama_cls(mc, rngs=nnx.Rngs(0))
        return lora.LoraAdapters(base, rank=rank, alpha=alpha, targets=targets, rngs=nnx.Rngs(1))

    return make


def _cut(per_layer: tuple, n: int) -> tuple:
    """A per-layer field (`layer_types`, `rope_layers`) for `n` layers: its first n values (repeated where the
    model has fewer), the last one replaced by the kind the cut lacks where the model mixes two kinds: a mixed model
    compiles one scanned body for both (a traced switch), a model of one kind a static one. One layer of a mixed
    model is of that other kind too: SmolLM3's `rope_layers` then keeps its NoPE layer and per-layer flag, where
    (True,) would be stored as None, which `ModelConfig` refuses beside `layer_types` (SmolLM3 with a window)."""
    cut = tuple(per_layer[i % len(per_layer)] for i in range(n))
    other = [v for v in per_layer if v != cut[0]]
    return cut[:-1] + (other[0],) if other and len(set(cut)) == 1 else cut


def plan_steps(cfg, mesh, steps=STEPS, layers: int | None = None) -> list[StepPlan]:
    """Lowers and compiles `steps` for `cfg` on `mesh` (abstract inputs); with `layers` both models
    get that many layers. Returns one StepPlan per step."""
    import jax
    from flax import nnx

    from proxykd_jax.align import lora, objectives
    from proxykd_jax.bayes import estimate
    from proxykd_jax.bayes.prior import SparsePrior
    from proxykd_jax.models.llama import Llama, ModelConfig, flops_per_token
    from proxykd_jax.parallel.rules import normalize_rules
    from proxykd_jax.parallel.sharding import batch_sharding, replicated
    from proxykd_jax.train import distill, optim
    from proxykd_jax.train import step as step_lib

    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        raise ValueError(f"unknown step(s) {unknown}; choose from {', '.join(STEPS)}.")
    rules = normalize_rules(cfg.mesh.rules)
    n_dev = mesh.devices.size

    def model_cfg(group):
        mc = ModelConfig.from_config(group)
        if not layers:
            return mc
        per_layer = {f: _cut(getattr(mc, f), layers) for f in ("layer_types", "rope_layers") if getattr(mc, f)}
        return dataclasses.replace(mc, num_layers=layers, **per_layer)

    student, proxy = model_cfg(cfg.model), model_cfg(cfg.proxy)
    optimizer = optim.make_optimizer(cfg.optim, max(int(cfg.train.steps), 1))
    k = int(cfg.data.store.k)
    for name in steps:  # every step's rows checked before the first is lowered
        rows, _, field, _ = row_shape(cfg, name)
        _check_rows(name, rows, field, mesh, rules)
    out = []
    for i, name in enumerate(steps):
        mc = student if model_group(name) == "model" else proxy
        log.info("plan: compiling the %s step (%d of %d) at %d layers", name, i + 1, len(steps), mc.num_layers)
        b, length, _, _ = row_shape(cfg, name)
        if name == "distill":
            graphdef, state, sh = _abstract_train_state(_maker(Llama, mc), optimizer, mesh, rules)
            fields = _rows(b, length, "tokens", "targets", "positions", "segment_ids", "sample_ids")
            fields.update(_rows(b, length, "loss_mask", "kd_tail", "weight", dtype="float32"))
            fields.update(kd_ids=((b, length, k), "int32"), kd_logprobs=((b, length, k), "float32"))
            batch = _batch(fields, mesh, rules)
            fn = step_lib.make_train_step(
                distill.make_loss_fn(cfg.distill.loss),
                graphdef,
                optimizer,
                state_shardings=sh,
                batch_shardings=batch_sharding(mesh, rules),
            )
            args = (state, batch)
            flops = b * length * flops_per_token(mc, length, backward=True)
        elif name in ("sft", "sft_lora", "dpo", "dpo_lora"):
            chunk = int(cfg.align.logprob_chunk)
            frozen, frozen_sh = (), ()
            if name.endswith("lora"):
                lcfg = cfg.align.lora
                rank = int(lcfg.rank) or 16
                base_gd, base_state = _abstract_module(_maker(Llama, mc), mesh, rules)

                make_adapters = _adapters_maker(Llama, lora, mc, rank, float(lcfg.alpha), tuple(lcfg.targets))
                graphdef, state, sh = _abstract_train_state(make_adapters, optimizer, mesh, rules)
                frozen = (_Frozen(base_gd, base_state),)
                frozen_sh = (jax.tree.map(lambda x: x.sharding, base_state),)
                # frozen base: forward + input gradients only (no weight gradients): about 2x forward
                flops = b * length * flops_per_token(mc, length, backward=False) * 2
            else:
                graphdef, state, sh = _abstract_train_state(_maker(Llama, mc), optimizer, mesh, rules)
                flops = b * length * flops_per_token(mc, length, backward=True)
            fields = _rows(b, length, "tokens", "targets", "segment_ids")
            fields.update(_rows(b, length, "loss_mask", dtype="float32"))
            if name.startswith("dpo"):
                fields["ref_logp"] = ((b,), "float32")
                inner = objectives.dpo_loss_fn
                kw = dict(beta=float(cfg.align.beta), nll_weight=float(cfg.align.nll_weight), chunk=chunk)
            else:
                inner = objectives.sft_loss_fn
                kw = dict(chunk=chunk)

            def loss_fn(model, batch, *fz, inner=inner, kw=kw):
                return inner(model, batch, *(f.module() for f in fz), **kw)

            batch = _batch(fields, mesh, rules)
            fn = step_lib.make_train_step(
                loss_fn,
                graphdef,
                optimizer,
                state_shardings=sh,
                batch_shardings=batch_sharding(mesh, rules),
                frozen_shardings=tuple(_Frozen(f.graphdef, s) for f, s in zip(frozen, frozen_sh)),
            )
            args = (state, batch, *frozen)
        elif name == "posterior":
            graphdef, state = _abstract_module(_maker(Llama, mc), mesh, rules)
            batch = _batch(_rows(b, length, "tokens", "positions", "segment_ids"), mesh, rules)
            n = b * length
            s1, s2 = int(cfg.prior.exact_top_s), int(cfg.prior.ngram_top_s) * int(cfg.prior.ngram_order)
            tok = batch_sharding(mesh, rules)
            tok1 = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(tok.spec[0]))

            def arr(shape, dtype, sharding=tok1):
                return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

            prior = SparsePrior(
                arr((n, s1), "int32"), arr((n, s1), "float32"), arr((n, s2), "int32"), arr((n, s2), "float32"),
                arr((n,), "float32"),
            )  # fmt: skip
            rep = replicated(mesh)
            head = int(cfg.data.teacher_topk)
            fn = estimate.make_posterior_step(graphdef, cfg.posterior, k=k, mesh=mesh, rules=rules)
            args = (
                state,
                batch,
                prior,
                arr((mc.vocab_size,), "float32", rep),
                arr((n,), "float32"),
                arr((), "float32", rep),
                None,
                arr((n, head), "int32"),
                arr((n, head), "float32"),
            )
            flops = n * flops_per_token(mc, length, backward=False)
        elif name == "eval":
            graphdef, state = _abstract_module(_maker(Llama, mc), mesh, rules)
            fields = _rows(b, length, "tokens", "targets", "segment_ids")
            fields.update(_rows(b, length, "loss_mask", dtype="float32"))
            batch = _batch(fields, mesh, rules)
            chunk = int(cfg.align.logprob_chunk)

            def eval_fn(state, batch, graphdef=graphdef, chunk=chunk):
                return objectives.sft_loss_fn(nnx.merge(graphdef, state), batch, chunk=chunk)[0]

            fn = jax.jit(eval_fn, out_shardings=replicated(mesh))
            args = (state, batch)
            flops = b * length * flops_per_token(mc, length, backward=False)
        with jax.set_mesh(mesh):  # the model pins activation rows to the batch axes (llama.shard_batch)
            compiled = fn.lower(*args).compile()
        out.append(dataclasses.replace(_measure(name, compiled, mc.num_layers, flops, n_dev), rows=b, seq_len=length))
        del compiled
    return out


@dataclasses.dataclass(frozen=True)
class _Frozen:
    """A frozen model passed to a step as (static graphdef, state): a pytree whose only leaves are the state."""

    graphdef: object
    state: object

    def module(self):
        from flax import nnx

        return nnx.merge(self.graphdef, self.state)


def _register_frozen():
    import jax

    jax.tree_util.register_pytree_node(
        _Frozen, lambda f: ((f.state,), f.graphdef), lambda graphdef, children: _Frozen(graphdef, children[0])
    )


_register_frozen()


def extrapolate(low: list[StepPlan], high: list[StepPlan], depth: dict[str, int]) -> list[StepPlan]:
    """Per step, bytes and FLOPs on the line through (layers, value) at two depths, read at `depth[name]`."""
    out = []
    for a, b in zip(low, high):
        target = depth[a.name]
        t = (target - a.layers) / (b.layers - a.layers)

        def line(x, y, t=t):
            return x + (y - x) * t

        out.append(
            dataclasses.replace(
                a,
                layers=target,
                argument_bytes=line(a.argument_bytes, b.argument_bytes),
                output_bytes=line(a.output_bytes, b.output_bytes),
                temp_bytes=line(a.temp_bytes, b.temp_bytes),
                alias_bytes=line(a.alias_bytes, b.alias_bytes),
                hlo_flops=line(a.hlo_flops, b.hlo_flops),
                model_flops=line(a.model_flops, b.model_flops),
            )
        )
    return out
