"""A user's run with a Qwen3 student through `configs/hf.py:STUDENT,PROXY`: the student and the proxy must share one
tokenizer (README), the run's. A model folder holding another tokenizer is refused before the stage that would train
it on the run's ids (prepare, align, distill), naming the folder and an id the two tokenizers disagree on; the same
vocabulary with another chat template, a tokenizer the run's extends, or a folder without a tokenizer are taken."""

import json
import pathlib
import random
import runpy

import pytest
from flax import nnx
from stage_helpers import run_stage
from test_data_common import WORDS, sentence

from proxykd_jax import context
from proxykd_jax.errors import ProxyKDError
from proxykd_jax.models import hf
from proxykd_jax.models.llama import Llama, ModelConfig
from proxykd_jax.models.tokenizer import build_word_tokenizer

REPO = pathlib.Path(__file__).resolve().parent.parent
QWEN3 = ModelConfig(
    vocab_size=48, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16, d_ff=48,
    max_seq_len=128, rms_eps=1e-6, rope_theta=1e6, qk_norm=True, tie_embeddings=True,
)  # fmt: skip
LLAMA = ModelConfig(vocab_size=40, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=48)


def _folder(path, cfg, tokenizer):
    hf.save_hf(Llama(cfg, rngs=nnx.Rngs(0)), cfg, path, tokenizer=tokenizer)
    return path


def _config(tmp_path, student, proxy, **fields):
    """`--config=configs/hf.py:STUDENT,PROXY` with a run directory, a corpus and short rows."""
    cfg = runpy.run_path(str(REPO / "configs" / "hf.py"))["get_config"](f"{student},{proxy}")
    cfg.run.dir = str(tmp_path / "run")
    cfg.data.corpus = str(tmp_path / "corpus.jsonl")
    cfg.data.seq_len = cfg.train.seq_len = 32
    cfg.distill.loss.alpha = 0.0  # (the SFT student: distill then reads prepared/ alone)
    for key, value in fields.items():
        group, field = key.split(".")
        cfg[group][field] = value
    return cfg


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    run_tok = build_word_tokenizer(WORDS)
    other = build_word_tokenizer(WORDS[::-1])  # the same words, other ids
    templated = build_word_tokenizer(WORDS)
    templated.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
    return {
        "proxy": _folder(root / "llama-proxy", LLAMA, run_tok),
        "other": _folder(root / "qwen3-other-tokenizer", QWEN3, other),
        "same": _folder(root / "qwen3-same-vocabulary", QWEN3, templated),  # another chat template only
        "more": _folder(root / "qwen3-extended", QWEN3, build_word_tokenizer([*WORDS, "extra", "tokens"])),
        "none": _folder(root / "qwen3-no-tokenizer", QWEN3, None),
        "words": (WORDS[0], WORDS[-1]),  # id 4 in the run's tokenizer and in the other one
    }


def _corpus(tmp_path):
    rng = random.Random(0)
    rows = [
        {"id": f"q{i}", "prompt": sentence(rng, 3), "responses": [sentence(rng, 4), sentence(rng, 5)]} for i in range(8)
    ]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_student_of_another_tokenizer_is_refused_before_prepare(tmp_path, folders):
    _corpus(tmp_path)
    cfg = _config(tmp_path, folders["other"], folders["proxy"])
    assert cfg.data.tokenizer == str(folders["proxy"])  # configs/hf.py: the proxy's tokenizer is the run's
    ours, theirs = folders["words"]
    with pytest.raises(
        ProxyKDError,
        match=r"config\.model\.init_from=\S*qwen3-other-tokenizer holds another tokenizer "
        rf"than data\.tokenizer=\S*llama-proxy: id 4 is '{theirs}' there and '{ours}' in the run's",
    ) as e:
        context.preflight(cfg, "prepare")
    assert "\n" not in str(e.value) and not (tmp_path / "run" / "prepared").exists()
    for kind in ("same", "more", "none"):  # the same ids (another template, extra tokens) or no tokenizer at all
        context.preflight(_config(tmp_path, folders[kind], folders["proxy"]), "prepare")


def test_align_and_distill_refuse_a_folder_of_another_tokenizer_than_the_prepared_one(tmp_path, folders):
    _corpus(tmp_path)
    good = _config(tmp_path, folders["same"], folders["proxy"])
    run_stage("prepare", good)
    for kind in ("same", "more", "none"):
        context.preflight(_config(tmp_path, folders[kind], folders["proxy"]), "distill")
    context.preflight(good, "align")
    refusal = (
        r"config\.{}\.init_from=\S*qwen3-other-tokenizer holds another tokenizer than the run's \(\S*prepared/tokenizer"
    )
    with pytest.raises(ProxyKDError, match=refusal.format("model")):
        context.preflight(_config(tmp_path, folders["other"], folders["proxy"]), "distill")
    with pytest.raises(ProxyKDError, match=refusal.format("proxy")):  # the proxy read from another folder
        context.preflight(
            _config(tmp_path, folders["same"], folders["proxy"], **{"proxy.init_from": str(folders["other"])}), "align"
        )
