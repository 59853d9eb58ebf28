"""An export with `source` (proxykd export, distill's final/, align's aligned proxy) keeps the source folder's
generation_config.json sampling defaults (Gemma 3's do_sample / top_k 64 / top_p 0.95, Llama 3 Instruct's temperature
0.6), so transformers' `generate` on the export samples as on the source instead of falling back to greedy; the stop
ids stay the export's own, and without a source the file holds the stop ids alone, as before."""

import json

import numpy as np
import pytest
import transformers
from flax import nnx

from proxykd_jax.errors import ProxyKDError
from proxykd_jax.models import hf
from proxykd_jax.models.llama import Llama, ModelConfig
from proxykd_jax.models.tokenizer import build_word_tokenizer

CFG = ModelConfig(vocab_size=32, d_model=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, d_ff=32)


@pytest.fixture(scope="module")
def model():
    return Llama(CFG, rngs=nnx.Rngs(0))


def _sampling(rng) -> dict:
    """Sampling defaults a source folder may carry, fresh random numbers each run."""
    return {
        "do_sample": True,
        "top_k": int(rng.integers(2, 100)),
        "top_p": round(float(rng.uniform(0.5, 0.99)), 4),
        "temperature": round(float(rng.uniform(0.2, 1.5)), 4),
        "repetition_penalty": round(float(rng.uniform(1.0, 1.3)), 4),
        "max_new_tokens": int(rng.integers(16, 512)),
    }


def test_the_sources_sampling_defaults_survive_the_export_and_the_stop_ids_stay_ours(model, tmp_path):
    rng = np.random.default_rng()
    sampling = _sampling(rng)
    source = tmp_path / "source"
    hf.save_hf(model, CFG, source)
    theirs = {"bos_token_id": 11, "eos_token_id": [12, 13], "pad_token_id": 14, "transformers_version": "0.0.1"}
    (source / "generation_config.json").write_text(json.dumps({**theirs, **sampling}))
    tok = build_word_tokenizer(["a", "b", "c"], tmp_path / "tok")
    stop = int(rng.integers(20, 30))
    hf.save_hf(model, CFG, tmp_path / "plain", tok, stop_ids=(stop,))
    hf.save_hf(model, CFG, tmp_path / "out", tok, stop_ids=(stop,), source=source)
    plain = json.loads((tmp_path / "plain" / "generation_config.json").read_text())
    written = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert plain == hf.token_ids_of(tok, (stop,))  # without a source: the stop ids alone, as before
    assert written == {**sampling, **plain}  # the source's fields, its stop ids and version replaced by ours
    loaded = transformers.GenerationConfig.from_pretrained(tmp_path / "out")
    assert {k: getattr(loaded, k) for k in sampling} == sampling
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (
        tok.bos_token_id,
        [tok.eos_token_id, stop],
        tok.pad_token_id,
    )
    # no tokenizer: no stop ids written, none taken from the source either
    hf.save_hf(model, CFG, tmp_path / "bare", source=source)
    assert json.loads((tmp_path / "bare" / "generation_config.json").read_text()) == sampling


def test_a_source_without_generation_config_and_a_broken_one(model, tmp_path):
    source = tmp_path / "source"
    hf.save_hf(model, CFG, source)
    (source / "generation_config.json").unlink()
    hf.save_hf(model, CFG, tmp_path / "out", source=source)
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text()) == {}
    (source / "generation_config.json").write_text("[1, 2]")
    with pytest.raises(ProxyKDError, match="generation_config.json is not a JSON object"):
        hf.save_hf(model, CFG, tmp_path / "broken", source=source)
