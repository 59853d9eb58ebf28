"""Running a stage from a test as the CLI does: one run context (mesh, paths, lock) per call; the distill stage
stopped mid-run; a synthetic posterior store for the distill stage to read."""

from __future__ import annotations


class Stop(Exception):
    """An interruption a test injects (as a kill would leave the artifact: the lock released)."""


def interrupted_distill(cfg, at_call: int) -> None:
    """The distill stage on `cfg`, stopped by `Stop` raised at its `at_call`-th train step call (the step not run)."""
    import pytest

    from proxykd_jax import context
    from proxykd_jax.stages import distill

    with context.create(cfg, "distill") as ctx:
        setup = distill.setup(ctx, ctx.artifact("distill"))
        step, calls = setup.loop.train_step, [0]

        def stopping_step(*args):
            calls[0] += 1
            if calls[0] == at_call:
                raise Stop
            return step(*args)

        setup.loop.train_step = stopping_step
        with pytest.raises(Stop):
            setup.train()


def changed(cfg, **fields):
    """A copy of `cfg` with `group__field=value` set (`__` for the dots of a field's path)."""
    cfg = cfg.copy_and_resolve_references()
    cfg.update_from_flattened_dict({key.replace("__", "."): value for key, value in fields.items()})
    return cfg


def run_stage(name: str, cfg, *, devices=None, **kwargs):
    """`proxykd <name>` on `cfg` in this process (mesh over `devices`, default all); returns its result."""
    from proxykd_jax import context, stages

    with context.create(cfg, name, devices=devices) as ctx:
        return stages.run_stage(name, ctx, **kwargs)


def synthetic_store(run, k: int, vocab: int, rng) -> None:
    """`<run>/posterior`: random top-`k` posteriors over `vocab` ids (Dirichlet, with a tail) and random sample
    weights for every response position of the prepared distillation split, drawn from `rng`."""
    import numpy as np

    from proxykd_jax.data.records import PreparedData
    from proxykd_jax.data.store import StoreWriter

    prepared = PreparedData(run / "prepared")
    with StoreWriter(
        run / "posterior", k=k, vocab_size=vocab, tokenizer_hash=prepared.tokenizer_hash, value_dtype="float32"
    ) as writer:
        for rec in prepared.iter_split("distill"):
            t = len(rec["tokens"]) - int(rec["prompt_len"])
            ids = np.stack([rng.permutation(vocab)[:k] for _ in range(t)]).astype(np.int32)
            probs = rng.dirichlet(np.full(k + 1, 0.3), size=t)
            writer.add(int(rec["sample_id"]), ids, np.log(probs[:, :k]), probs[:, k], weight=rng.uniform(0.2, 1.0))
