"""The tiled losses split their work over the devices that hold the tokens: with the token axis sharded over
8 devices each device computes 1/8 of every tile (tiles are strided over the tokens), where contiguous tiles
each lay on one device and every device computed every tile whole. Values and gradients equal one device's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from proxykd_jax.losses import likelihood

N, D, V, C = 8 * 64, 32, 1024, 64


def _ce(h, W, t, m):
    return jax.value_and_grad(lambda h, W: likelihood.cross_entropy_chunked(h, W, t, m, chunk_size=C)[0], (0, 1))(h, W)


def _seq(h, W, t, m):
    b = 8
    f = lambda h, W: jnp.sum(  # noqa: E731
        likelihood.sequence_logprobs(h.reshape(b, -1, D), W, t.reshape(b, -1), m.reshape(b, -1), chunk_size=C)
    )
    return jax.value_and_grad(f, (0, 1))(h, W)


@pytest.mark.parametrize("loss", [_ce, _seq], ids=["fused", "rematerialised"])
def test_each_device_computes_its_share_of_every_tile(loss):
    rng = np.random.default_rng()
    host = (
        rng.normal(size=(N, D)).astype(np.float32),
        (rng.normal(size=(D, V)) * 0.1).astype(np.float32),
        rng.integers(0, V, N).astype(np.int32),
        (rng.random(N) < 0.8).astype(np.float32),
    )
    flops, values = {}, {}
    for devices in (1, 8):
        mesh = Mesh(jax.devices()[:devices], ("fsdp",))
        specs = (P("fsdp"), P(None), P("fsdp"), P("fsdp"))
        args = [jax.device_put(x, NamedSharding(mesh, s)) for x, s in zip(host, specs)]
        fn = jax.jit(loss)
        flops[devices] = fn.lower(*args).compile().cost_analysis()["flops"]
        values[devices] = jax.tree.map(np.asarray, fn(*args))
    assert flops[8] < flops[1] / 6, flops  # (contiguous tiles: flops[8] == flops[1])
    np.testing.assert_allclose(values[8][0], values[1][0], rtol=1e-5)
    for got, want in zip(values[8][1], values[1][1]):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
