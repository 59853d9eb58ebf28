"""Review of three changes: the Checkpointer's wait for orbax's removal of half-written steps, longrope generation's
re-prefill at original_max, and the unrolled mixed model's static windows.

- A checkpoint folder whose half-written steps cannot be removed (read-only: exporting another's run) opened with a
  raw PermissionError once `Checkpointer.__init__` waited for orbax's cleanup thread (before, it opened and the
  thread's failure was only logged); it opens again, with a one-line warning, and a later save does not raise it.
- The re-prefill of a crossing row (`sampling._recross`) took its one token's logits from `Llama.decode`'s
  [1, P + min(T, original_max), V] float32 logits: 6 GB more XLA temporaries for Phi-4-mini's 200k vocabulary at
  P 4096. `decode(..., logits_at_B=...)` computes the one row's logits only; the re-prefill's values stay
  transformers' (tests/test_longrope_generate.py). The prompt's prefill now takes each row's last prompt token's
  logits the same way (it held [B, P, V] float32: 16 GB at B 8, P 4096 and a 128k vocabulary).
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from orbax.checkpoint._src.path import async_path

from proxykd_jax.models import sampling
from proxykd_jax.models.llama import Llama, ModelConfig
from proxykd_jax.train.checkpoint import Checkpointer


def test_a_folder_whose_half_written_steps_cannot_be_removed_still_opens(tmp_path, monkeypatch, caplog):
    """orbax's cleanup thread fails to remove a killed save's folder (a folder this process may not write, simulated:
    the tests may run as root): the Checkpointer opens with a warning naming the folder, reads the finished steps,
    and its first save (which orbax makes wait for the same thread) neither raises that error again."""
    w = np.random.default_rng().normal(size=(4, 3)).astype(np.float32)
    ckpt = Checkpointer(tmp_path, keep=2)
    ckpt.save(1, {"w": jnp.asarray(w)})
    ckpt.wait()
    ckpt.close()
    half = tmp_path / "3.orbax-checkpoint-tmp-1733500000000000"  # what a killed save leaves
    half.mkdir()

    async def refused(path, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(async_path, "rmtree", refused)
    caplog.set_level("WARNING", logger="proxykd_jax.train.checkpoint")
    ckpt = Checkpointer(tmp_path, keep=2)
    assert ckpt.all_steps() == [1] and half.exists()
    (record,) = [r for r in caplog.records if r.name == "proxykd_jax.train.checkpoint"]
    assert str(tmp_path) in record.getMessage() and "Permission denied" in record.getMessage()
    ckpt.save(2, {"w": jnp.asarray(2 * w)})
    ckpt.wait()
    assert ckpt.all_steps() == [1, 2]
    ckpt.close()


V, ORIGINAL = 65536, 256


def _longrope_model(vocab: int, dtype: str = "float32") -> Llama:
    """A one-layer longrope (Phi-3) model, every parameter random."""
    rng = np.random.default_rng()
    scaling = ("longrope", ORIGINAL, 1.2, tuple(1 + rng.random(4)), tuple(2 + 6 * rng.random(4)))
    cfg = ModelConfig(
        vocab_size=vocab, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64,
        max_seq_len=1024, rope_scaling=scaling, dtype=dtype,
    )  # fmt: skip
    model = Llama(cfg, rngs=nnx.Rngs(int(rng.integers(1 << 31))))
    params = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(int(rng.integers(1 << 31))), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [0.5 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]))
    return model


def test_the_re_prefill_holds_no_logits_of_the_whole_row():
    """`_generate`'s XLA temporaries with the re-prefill are those of the program without it, not one [1, W, V]
    float32 more (W = P + min(T, original_max) = 320 here: 80 MiB at V 65536; measured 81.5 MiB against 17.0 before,
    17.1 after)."""
    model = _longrope_model(V)
    graphdef, state = nnx.split(model)
    b, p, t = 1, 64, 512  # a row of P crosses original_max at step ORIGINAL - P
    static = dict(max_new_tokens=t, top_k=0, stop_tokens=(), pad_id=0, return_logprobs=True, top_logprobs=0)
    args = (graphdef, state, jnp.zeros((b, p), jnp.int32), jnp.full((b,), p, jnp.int32), jax.random.key(0))
    args += (jnp.ones(b), jnp.ones(b))
    temps = {
        recross: sampling._generate.lower(*args, **static, recross=recross).compile().memory_analysis()
        for recross in (False, True)
    }
    row_logits = (p + min(t, ORIGINAL)) * V * 4
    extra = temps[True].temp_size_in_bytes - temps[False].temp_size_in_bytes
    assert extra < row_logits / 8, (extra, row_logits)


def test_decode_logits_at_one_index_per_row_are_the_whole_calls():
    """`decode(..., logits_at_B=...)` returns each row's logits at its index, [B, 1, V]: those the call without it
    computes there (random parameters, packed prompt rows with padding), and the same cache."""
    model = _longrope_model(97)
    rng = np.random.default_rng()
    b, length = 3, 24
    tokens = jnp.asarray(rng.integers(0, 97, (b, length)))
    segments = np.ones((b, length), np.int32)
    segments[1, 17:] = 0
    segments[2, :5] = 0
    positions = jnp.broadcast_to(jnp.arange(length), (b, length))
    at_B = jnp.asarray(rng.integers(0, length, b), jnp.int32)
    run = jax.jit(lambda m, at: m.decode(tokens, positions, jnp.asarray(segments), m.init_cache(b, 32), logits_at_B=at))
    whole, whole_cache = run(model, None)
    one, one_cache = run(model, at_B)
    assert one.shape == (b, 1, 97) and np.abs(np.asarray(whole)).max() > 0.1
    np.testing.assert_allclose(one[:, 0], np.asarray(whole)[np.arange(b), np.asarray(at_B)], rtol=1e-5, atol=1e-5)
    for a, c in zip(jax.tree.leaves(one_cache), jax.tree.leaves(whole_cache)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


def test_the_prompt_prefill_holds_no_logits_of_every_position():
    """`_generate` keeps only each row's last prompt token's logits from the prefill: its XLA temporaries hold no
    [B, P, V] float32 (256 MiB here; at B 8, P 4096 and a 128k vocabulary it was 16 GB)."""
    model = _longrope_model(V)
    graphdef, state = nnx.split(model)
    b, p, t = 4, 240, 8  # within original_max: no re-prefill
    static = dict(max_new_tokens=t, top_k=0, stop_tokens=(), pad_id=0, return_logprobs=True, top_logprobs=0)
    args = (graphdef, state, jnp.zeros((b, p), jnp.int32), jnp.asarray([p, 3, 100, 17], jnp.int32))
    args += (jax.random.key(0), jnp.ones(b), jnp.ones(b))
    temps = sampling._generate.lower(*args, **static).compile().memory_analysis().temp_size_in_bytes
    all_logits = b * p * V * 4
    assert temps < all_logits / 8, (temps, all_logits)
