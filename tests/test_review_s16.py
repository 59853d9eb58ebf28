"""Review of the Phi-3 support: longrope's switch to the long factors is taken per sequence, as transformers takes it
for one sequence run alone. A short sequence (within original_max_position_embeddings) keeps the short factors beside
a long row, packed before a longer sequence, on 8 devices as on one, and in a batched generation beside a long
prompt; before, one token past the original context anywhere in the call switched every row of it."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from parallel_helpers import mesh_cfg
from test_hf import _hf_logits
from test_phi3 import _longrope, _phi3, _tokens

from proxykd_jax.models import hf
from proxykd_jax.models.sampling import generate
from proxykd_jax.parallel import LOGICAL_RULES, global_batch, make_mesh, under_mesh

ORIGINAL = 16  # the tiny Phi-3's original_max_position_embeddings (its context 128)


def test_a_longrope_sequence_is_computed_as_if_alone_on_one_device_and_eight(tmp_path):
    ref = _phi3(**_longrope(ORIGINAL))
    ref.save_pretrained(tmp_path)
    short, long, mid = _tokens(1, 12)[0], _tokens(1, 40)[0], _tokens(1, 28)[0]
    pad = np.zeros(40, int)
    rows = [  # (tokens, segment ids): 8 rows, the sequences within them
        (np.concatenate([short, pad[:28]]), [1] * 12 + [0] * 28),  # short, then padding
        (long, [1] * 40),  # past the original context
        (np.concatenate([short, mid]), [1] * 12 + [2] * 28),  # packed: short, then one past the original
        (np.concatenate([mid[:20], pad[:20]]), [1] * 20 + [0] * 20),  # past it, then padding
    ]
    rows += [(np.concatenate([short, short, mid[:16]]), [1] * 12 + [2] * 12 + [3] * 16)] * 4  # three within it
    tokens, segments = np.stack([t for t, _ in rows]), np.asarray([s for _, s in rows], np.int32)
    alone = {n: _hf_logits(ref, seq[None])[0] for n, seq in ((12, short), (40, long), (28, mid), (20, mid[:20]))}
    alone[16] = _hf_logits(ref, mid[None, :16])[0]
    expected = [[(0, 12, 12)], [(0, 40, 40)], [(0, 12, 12), (12, 40, 28)], [(0, 20, 20)]]
    expected += [[(0, 12, 12), (12, 24, 12), (24, 40, 16)]] * 4  # (start, end, which sequence alone)
    results = []
    for fsdp in (1, 8):
        mesh = make_mesh(mesh_cfg(fsdp=fsdp), jax.devices()[:fsdp])
        _, model = hf.load_hf(tmp_path, mesh=mesh, rules=LOGICAL_RULES, run={"scan_layers": True})
        graphdef, state = nnx.split(model)
        forward = under_mesh(jax.jit(lambda st, t, s, g=graphdef: nnx.merge(g, st)(t, None, s)), mesh)
        batch = global_batch(dict(tokens=tokens, segment_ids=segments), mesh, LOGICAL_RULES)
        results.append(np.asarray(forward(state, batch["tokens"], batch["segment_ids"])))
    for logits in results:
        for row, spans in enumerate(expected):
            for start, end, n in spans:
                np.testing.assert_allclose(logits[row, start:end], alone[n], atol=1e-4, rtol=1e-4, err_msg=str(row))
    np.testing.assert_allclose(results[1], results[0], atol=1e-4, rtol=1e-4)  # 8 devices: one's


def test_batched_generation_gives_each_row_what_it_gets_alone(tmp_path):
    """A prompt within the original context generating within it, beside one past it: each row's greedy tokens are
    transformers' generate() of that prompt alone (before: the long prompt switched the short row's factors)."""
    ref = _phi3(**_longrope(ORIGINAL), tie_word_embeddings=True)
    ref.save_pretrained(tmp_path)
    _, model = hf.load_hf(tmp_path, run={"scan_layers": False})
    assert json.loads((tmp_path / "config.json").read_text())["original_max_position_embeddings"] == ORIGINAL
    prompts, lengths, new = _tokens(2, 20), np.array([6, 20]), 6  # row 0 reaches 12 <= 16, row 1 starts past it
    out = generate(model, jnp.asarray(prompts), lengths, jax.random.key(0), max_new_tokens=new, temperature=0)
    for row, n in enumerate(lengths):
        ids = torch.tensor(prompts[row : row + 1, :n])
        with torch.no_grad():
            theirs = ref.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False, eos_token_id=None
            )
        np.testing.assert_array_equal(np.asarray(out.tokens_BxT)[row], theirs[0, n:].numpy(), err_msg=str(row))
