"""A chat student or proxy ends its answers with the chat template's end of turn (Llama 3's <|eot_id|>, not its eos
<|end_of_text|>: `prepare` ends templated answers there), and keeps stopping there after training: the export and
the aligned proxy list it in their eos_token_id, `serve` stops at it, and DPO's sampled answers hold no other
special token (as eval's never do)."""

import json
import random

import numpy as np
import transformers
from flax import nnx
from stage_helpers import run_stage
from test_data_common import tiny_cfg, write_jsonl
from test_distill_stage import make_config
from test_end_of_turn import _rows, toks  # noqa: F401  (toks is a fixture)

from proxykd_jax.data import byte_head, prepare
from proxykd_jax.models import hf
from proxykd_jax.models.llama import Llama, ModelConfig

V = 336  # past the tokenizer's ids (a padded embedding)


def _model_cfg():
    return ModelConfig(
        vocab_size=V, d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, d_ff=48, max_seq_len=256
    )


def _prepared(tok, root, n=24, **split):
    """`prepare`'s output for templated rows (+ the run's tokenizer folder beside it, as the stage writes it)."""
    rows = [dict(r, id=f"r{i}") for i, r in enumerate(_rows(random.Random(11), n=n))]
    cfg = tiny_cfg(seq_len=256)
    cfg.split.update(split)
    root.parent.mkdir(parents=True, exist_ok=True)
    prepare([write_jsonl(root.parent / "corpus.jsonl", rows)], tok, root, cfg, progress=False)
    tok.save_pretrained(str(root / "tokenizer"))
    return root


def _eos_ids(folder):
    return [
        json.loads((folder / name).read_text())["eos_token_id"] for name in ("config.json", "generation_config.json")
    ]


def _served_stop_ids(folder):
    from proxykd_jax.teacher.backends import load_backend
    from proxykd_jax.teacher.config import serve_config

    serve = serve_config()
    serve.update(source="hf", path=str(folder))
    return load_backend(serve).stop_ids


def test_export_of_a_base_student_lists_the_turn_end_it_was_trained_on(toks, tmp_path, monkeypatch):  # noqa: F811
    """A base student (its folder lists the eos alone, as a base Llama 3 does) trained on templated answers: the
    export lists the manifest's end of turn besides the eos, and transformers and `serve` stop there (it listed
    the eos alone, and generate ran past <|eot_id|>)."""
    from proxykd_jax.stages import export
    from proxykd_jax.train.export import default_config

    tok = toks["llama3"]
    eos, eot = tok.eos_token_id, tok.convert_tokens_to_ids("<|eot_id|>")
    run = tmp_path / "run"
    _prepared(tok, run / "prepared")
    model_cfg = _model_cfg()
    student = tmp_path / "base_student"
    hf.save_hf(Llama(model_cfg, rngs=nnx.Rngs(0)), model_cfg, student, tokenizer=tok)
    assert hf.generation_stop_ids(student) == (eos,)
    cfg = make_config(run, **{"model.init_from": str(student)})
    cfg.export = default_config()
    trained = Llama(model_cfg, rngs=nnx.Rngs(1))
    monkeypatch.setattr(export, "load", lambda ctx, step=0, source=None: (model_cfg, trained, 3))
    out = run_stage("export", cfg)
    assert _eos_ids(out) == [[eos, eot]] * 2
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == [eos, eot]
    assert _served_stop_ids(out) == (eos, eot)


def test_serve_stops_at_the_served_tokenizers_turn_end(toks, tmp_path):  # noqa: F811
    """A chat model served with its template ends turns at the template's end of turn even where its
    generation_config.json lists the eos alone; a folder without a template stops at the eos and its own ids."""
    tok = toks["llama3"]
    eos, eot = tok.eos_token_id, tok.convert_tokens_to_ids("<|eot_id|>")
    model_cfg = _model_cfg()
    folder = tmp_path / "chat"
    hf.save_hf(Llama(model_cfg, rngs=nnx.Rngs(0)), model_cfg, folder, tokenizer=tok)
    assert _eos_ids(folder) == [eos, eos]
    assert _served_stop_ids(folder) == (eos, eot)
    plain = toks["no_template"]
    folder = tmp_path / "plain"
    hf.save_hf(Llama(model_cfg, rngs=nnx.Rngs(0)), model_cfg, folder, tokenizer=plain, stop_ids=(7,))
    assert _served_stop_ids(folder) == (plain.eos_token_id, 7)


def test_aligned_proxy_keeps_the_turn_end(toks, tmp_path):  # noqa: F811
    """`align`'s final proxy lists the run's end of turn besides the eos (it listed the eos alone, although the
    proxy it started from listed both), and the init folder's ids it is given."""
    from proxykd_jax.align import rounds

    tok = toks["llama3"]
    eos, eot = tok.eos_token_id, tok.convert_tokens_to_ids("<|eot_id|>")
    model_cfg = _model_cfg()
    proxy = Llama(model_cfg, rngs=nnx.Rngs(0))
    rounds.export_final(proxy, (), model_cfg, tmp_path / "final", ("wq",), None, tokenizer=tok)
    assert _eos_ids(tmp_path / "final") == [[eos, eot]] * 2
    assert _served_stop_ids(tmp_path / "final") == (eos, eot)
    rounds.export_final(proxy, (), model_cfg, tmp_path / "final", ("wq",), None, tokenizer=tok, stop_ids=(eot, 9))
    assert _eos_ids(tmp_path / "final") == [[eos, eot, 9]] * 2


def test_dpo_rejected_answers_hold_no_special_token_but_the_stops(toks, tmp_path):  # noqa: F811
    """DPO's rejected answers are sampled with the run's special tokens other than the stop tokens suppressed,
    as eval's answers are: a proxy whose every next token is equally likely (<unk>, <|end_header_id|>, ... among
    them) samples none of them, and still stops at the eos or the end of turn."""
    from proxykd_jax.align import config as align_config
    from proxykd_jax.align import rounds

    tok = toks["llama3"]
    eos, eot = tok.eos_token_id, tok.convert_tokens_to_ids("<|eot_id|>")
    prepared = _prepared(tok, tmp_path / "prepared", n=32, warmup=0.0, align=1.0, distill=0.0, heldout=0.0)
    data = rounds.AlignData.load(prepared)
    model_cfg = _model_cfg()
    proxy = Llama(model_cfg, rngs=nnx.Rngs(0))
    proxy.lm_head[...] = np.zeros((model_cfg.d_model, V), np.float32)  # uniform over the tokenizer's ids
    acfg = align_config.default_config()
    acfg.update(max_new_tokens=24, sample_batch_size=8, eval_batch_size=8, logprob_chunk=64, temperature=1.0, top_p=1.0)
    rows, _ = rounds._round_pairs(proxy, (), data, acfg, tmp_path / "round_000", 0, 0, 256, None)
    mask = rows["rejected_loss_mask"] > 0
    answers = [targets[m].tolist() for targets, m in zip(rows["rejected_targets"], mask)]
    ends = [a[-1] for a in answers if a[-1] in (eos, eot)]
    bodies = [a[:-1] if a[-1] in (eos, eot) else a for a in answers]
    specials = byte_head.special_ids(tok)
    assert len(answers) >= 24 and ends, (len(answers), ends)
    assert [tok.convert_ids_to_tokens(t) for b in bodies for t in b if t in specials] == []
    assert data.stop_tokens == (eos, eot) and set(data.suppress_tokens) == specials - {eos, eot}


def test_distilled_student_lists_the_turn_end(toks, tmp_path):  # noqa: F811
    """distill's `final/` (a Hugging Face folder users load and serve) lists the manifest's end of turn besides
    the eos and its start folder's ids, as the export does (it listed the eos alone)."""
    tok = toks["llama3"]
    eos, eot = tok.eos_token_id, tok.convert_tokens_to_ids("<|eot_id|>")
    run = tmp_path / "run"
    _prepared(tok, run / "prepared", n=40, warmup=0.0, align=0.0, distill=1.0, heldout=0.0)
    model_cfg = _model_cfg()
    student = tmp_path / "base_student"
    hf.save_hf(Llama(model_cfg, rngs=nnx.Rngs(0)), model_cfg, student, tokenizer=tok, stop_ids=(7,))
    assert hf.generation_stop_ids(student) == (eos, 7)
    cfg = make_config(run, **{"model.init_from": str(student), "model.vocab_size": V, "model.max_seq_len": 256})
    cfg.data.seq_len = cfg.train.seq_len = 256
    cfg.train.steps, cfg.train.checkpoint_every = 2, 0
    cfg.distill.loss.alpha = 0.0  # the SFT student: no posterior store needed
    summary = run_stage("distill", cfg)
    final = run / "student_sft" / "final"
    assert summary["final"].endswith("final") and _eos_ids(final) == [[eos, 7, eot]] * 2
    assert hf.trained_stop_ids((str(student),), run / "prepared") == (eos, 7, eot)
    assert hf.trained_stop_ids((), tmp_path / "nothing") == ()
