"""Bookkeeping of the align phases: per-phase parameter snapshots and completion markers, row
batches, and train states for existing modules.

Layout under <run>/proxy/:
    sft/            checkpoints/ (the train Loop's, while the phase runs), params/ (end of phase), DONE
    round_000/      reference/ (params at round start), pairs.npz, checkpoints/ (while it runs), params/, DONE
    ...
    final/          Hugging Face folder of the aligned proxy (LoRA merged), lora/ (adapters)
    metrics.jsonl   per-phase summaries (held-out NLL, pairs kept/dropped, KL when asked), one per phase
A phase is finished when its DONE marker exists; it is written after `params/` is complete. Its checkpoints
(train state with the optimizer's moments, `train.keep_checkpoints` of them) are then removed: a resumed run
reads a finished phase's `params/` only.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from proxykd_jax.align.pairs import ROW_FIELDS, row_lengths
from proxykd_jax.errors import ProxyKDError
from proxykd_jax.parallel import sharding as sharding_lib
from proxykd_jax.parallel.hosts import sync

DONE = "DONE"


def phase_names(rounds: int) -> list[str]:
    return ["sft"] + [f"round_{r:03d}" for r in range(rounds)]


def is_done(phase_dir: pathlib.Path) -> bool:
    return (phase_dir / DONE).exists()


def mark_done(phase_dir: pathlib.Path, summary: dict) -> None:
    """Writes the DONE marker (with a JSON summary) atomically, then removes the phase's checkpoints
    (process 0; every process waits)."""
    if jax.process_index() == 0:
        tmp = phase_dir / (DONE + ".tmp")
        tmp.write_text(json.dumps(summary, sort_keys=True) + "\n")
        tmp.replace(phase_dir / DONE)
    sync(f"align: {phase_dir.name} done")
    drop_checkpoints([phase_dir])


def drop_checkpoints(phase_dirs) -> None:
    """Removes the checkpoints of those of `phase_dirs` that are finished (a kill between a phase's DONE
    marker and their removal leaves them); process 0, every process waits."""
    if jax.process_index() == 0:
        for phase_dir in phase_dirs:
            if is_done(phase_dir):
                shutil.rmtree(phase_dir / "checkpoints", ignore_errors=True)
    sync("align: finished phases' checkpoints removed")


def drop_torn_row(path: pathlib.Path) -> None:
    """Cuts off the last row of `path` where a kill left it without its newline (process 0, which appends there):
    the next row appended would be glued to it, and neither read back. In place, so a sink already open to append
    there writes on from the cut."""
    if jax.process_index() != 0 or not path.exists():
        return
    text = path.read_bytes()
    if text and not text.endswith(b"\n"):
        os.truncate(path, text.rfind(b"\n") + 1)


def read_summaries(path: pathlib.Path) -> list[dict]:
    """The phase summaries of an align `metrics.jsonl` in file order (none where it does not exist; a line a
    crash cut short is skipped)."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else ():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "phase" in row:
            rows.append(row)
    return rows


class OncePerPhase:
    """A sink (`append(record)`) that passes on one summary per phase: those already in `out_dir/metrics.jsonl`
    are not written again. A phase summarised before a kill (the initial proxy, before the warm-up's first
    checkpoint; a phase, before its DONE marker) is summarised again, to the same values, when the run resumes;
    a summary the kill cut short is cut off the file first (`drop_torn_row`)."""

    def __init__(self, sink, out_dir: pathlib.Path):
        self.sink = sink
        path = pathlib.Path(out_dir) / "metrics.jsonl"
        drop_torn_row(path)
        self.phases = {row.get("phase") for row in read_summaries(path)}

    def append(self, record: dict) -> None:
        if record.get("phase") not in self.phases:
            self.phases.add(record.get("phase"))
            self.sink.append(record)


def shard_module(module: nnx.Module, mesh, rules) -> nnx.Module:
    """Places a (host-built) module's state on `mesh` by its parameters' logical axes."""
    graphdef, state = nnx.split(module)
    shardings = sharding_lib.state_shardings(state, mesh, rules)
    return nnx.merge(graphdef, jax.device_put(state, shardings))


def copy_module(module: nnx.Module) -> nnx.Module:
    """A copy with fresh device buffers (safe to keep while the original is donated)."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.tree.map(jnp.copy, state))


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def save_params(module: nnx.Module, path: pathlib.Path) -> None:
    """Saves the module's parameters with orbax (replacing a partial earlier attempt)."""
    import orbax.checkpoint as ocp

    path = pathlib.Path(path).absolute()
    if path.exists() and jax.process_index() == 0:
        shutil.rmtree(path)
    sync(f"align: {path.name} cleared")
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, nnx.state(module, nnx.Param))
        ckpt.wait_until_finished()


def restore_params(module: nnx.Module, path: pathlib.Path) -> nnx.Module:
    """A module like `module` (same graph and shardings) with parameters read from `path`."""
    import orbax.checkpoint as ocp

    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(pathlib.Path(path).absolute(), _abstract(params))
    return nnx.merge(graphdef, restored, rest)


def row_batches(rows: dict[str, np.ndarray], batch_size: int, seed: int, *, cut: bool = False):
    """An endless, checkpointable grain iterator of shuffled host-local batches of `rows`.

    Every process builds the same global batch order (epoch reshuffles from `seed`) and keeps its
    slice of rows [p * B_local, (p + 1) * B_local). With `cut` the position fields (`pairs.ROW_FIELDS`, [..., L]) of
    each batch are cut to the fewest of `pipeline.lengths_of(L)` positions that hold the global batch's longest row
    (every process holds all rows, so each finds the same length alone): a batch of short rows trains a short
    step, and the loss, a sum over positions, is the same.
    """
    import grain

    from proxykd_jax.data import pipeline  # (grain at its import: loaded where batches are made)

    n = next(iter(rows.values())).shape[0]
    if n < batch_size:
        raise ProxyKDError(
            f"{n} rows cannot fill one batch of align.batch_size={batch_size}; lower --config.align.batch_size "
            "(a multiple of the mesh's batch shards), or give the split more prompts (more data, or a larger "
            "data.split fraction, then re-run `proxykd prepare`)."
        )
    procs, proc = jax.process_count(), jax.process_index()
    if batch_size % procs:
        raise ProxyKDError(f"align.batch_size={batch_size} must be a multiple of the {procs} processes.")
    local = batch_size // procs
    if cut:
        seq_len = rows["segment_ids"].shape[-1]
        used = row_lengths(rows["segment_ids"]).reshape(n, -1).max(axis=1)  # a pair's rows are cut together

    def gather(idx):
        idx = np.asarray(idx)
        mine = idx[proc * local : (proc + 1) * local]
        if not cut:
            return {k: v[mine] for k, v in rows.items()}
        length = pipeline.cut_length(int(used[idx].max()), seq_len)
        return {k: v[mine][..., :length] if k in ROW_FIELDS else v[mine] for k, v in rows.items()}

    ds = grain.MapDataset.range(n).shuffle(seed=seed).repeat(None).batch(batch_size, drop_remainder=True)
    return iter(ds.map(gather).to_iter_dataset())


def train_state_from(module: nnx.Module, optimizer, mesh, rules):
    """(graphdef, TrainState, shardings) for an existing module, with a fresh optimizer state."""
    from proxykd_jax.train.state import TrainState, train_state_shardings

    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    shardings = train_state_shardings(params, rest, optimizer, mesh, rules)

    def init(p, r):
        return TrainState(step=jnp.zeros((), jnp.int32), params=p, rest=r, opt_state=optimizer.init(p))

    state = jax.jit(init, out_shardings=shardings)(params, rest)
    return graphdef, state, shardings


def interleave_pairs(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{tokens, targets, segment_ids, loss_mask} [2S, L] with chosen i at row 2i and rejected i at
    row 2i + 1, and `ref_logp` [2S] likewise: one row layout the train Loop and every process slice
    keep intact (pairs stay adjacent)."""
    out = {}
    for k in ("tokens", "targets", "segment_ids", "loss_mask"):
        c, r = rows["chosen_" + k], rows["rejected_" + k]
        out[k] = np.stack([c, r], axis=1).reshape((-1,) + c.shape[1:])
    out["ref_logp"] = np.stack([rows["ref_chosen_logp"], rows["ref_rejected_logp"]], axis=1).reshape(-1)
    return out


def pair_batches(rows: dict[str, np.ndarray], pairs_per_batch: int, seed: int, *, cut: bool = False):
    """Endless checkpointable grain iterator of interleaved pair batches ([2 * pairs_per_batch, L]; with `cut`, L
    cut to the batch's longest row as `row_batches` does)."""
    inter = interleave_pairs(rows)
    as_pairs = {k: v.reshape((-1, 2) + v.shape[1:]) for k, v in inter.items()}
    it = row_batches(as_pairs, pairs_per_batch, seed, cut=cut)
    return _Flatten(it)


class _Flatten:
    """Wraps a grain iterator of [P, 2, ...] batches into [2P, ...] batches; keeps get/set_state."""

    def __init__(self, inner):
        self.inner = inner

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.inner)
        return {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)
