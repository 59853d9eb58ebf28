"""A user's Gemma 3 chat run, as a user's own folders make it: a SentencePiece-style BPE tokenizer with byte fallback
(`<pad>`=0, `<eos>`=1, `<bos>`=2, `<start_of_turn>`, `<end_of_turn>`), Gemma's chat template in tokenizer_config.json
and `eos_token_id: [1, <end_of_turn>]` in generation_config.json. `prepare` (through `configs/hf.py`) starts every row
with one `<bos>` and ends chat answers with `<end_of_turn>`, plain ones with `<eos>`; `serve` formats a chat as
transformers does, stops at the end of turn, and answers a conversation the template refuses with a 400."""

import json
import pathlib
import random
import runpy

import pytest
import torch
import transformers
from fastapi.testclient import TestClient
from stage_helpers import run_stage
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from proxykd_jax.data.records import PreparedData
from proxykd_jax.teacher import backends
from proxykd_jax.teacher.config import serve_config
from proxykd_jax.teacher.server import make_app

REPO = pathlib.Path(__file__).resolve().parent.parent
WORDS = "the quick brown fox jumps over lazy dog cat sat on mat and ran far away under a bright blue sky".split()
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
BOS, EOS, EOT = 2, 1, 6
GEMMA_TEMPLATE = (  # Gemma 3's chat template (text parts only)
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}"
    "{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)


def _sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _gemma_tokenizer(folder: pathlib.Path) -> int:
    """Gemma's layout: spaces as `▁`, BPE pieces after the specials and the 256 `<0xNN>` byte-fallback tokens."""
    rng = random.Random(0)
    trainer = Tokenizer(models.BPE())
    trainer.normalizer = normalizers.Replace(" ", "\u2581")
    trainer.pre_tokenizer = pre_tokenizers.Split("\u2581", "merged_with_next")
    texts = [_sentence(rng, 6) for _ in range(200)] + ["user\nmodel\n"] * 5
    trainer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=120, show_progress=False))
    learned = json.loads(trainer.to_str())["model"]
    vocab = {s: i for i, s in enumerate(SPECIALS)} | {f"<0x{b:02X}>": len(SPECIALS) + b for b in range(256)}
    for piece, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split("\u2581", "merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    tok.save(str(folder / "tokenizer.json"))
    special = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
    special |= {"mask_token": "<mask>", "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]}
    config = {"tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": GEMMA_TEMPLATE}))
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    return len(vocab)


@pytest.fixture(scope="module")
def gemma(tmp_path_factory) -> pathlib.Path:
    """A user's tiny Gemma 3 folder (random weights, norms too), with its tokenizer and generation_config.json."""
    folder = tmp_path_factory.mktemp("gemma3-chat")
    vocab = _gemma_tokenizer(folder)
    torch.manual_seed(int(random.SystemRandom().randrange(1 << 31)))
    cfg = transformers.Gemma3TextConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, max_position_embeddings=256, sliding_window=64,
        layer_types=["sliding_attention", "full_attention"], bos_token_id=BOS, eos_token_id=EOS, pad_token_id=0,
    )  # fmt: skip
    model = transformers.Gemma3ForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim == 1 else 0.2))
    model.generation_config = transformers.GenerationConfig(bos_token_id=BOS, eos_token_id=[EOS, EOT], pad_token_id=0)
    model.save_pretrained(folder)
    return folder


def test_prepare_starts_rows_with_one_bos_and_ends_chat_answers_at_the_end_of_turn(tmp_path, gemma):
    rng = random.Random()
    rows = []
    for i in range(6):
        rows.append({"id": f"plain{i}", "prompt": _sentence(rng, 3), "response": " " + _sentence(rng, 4)})
        rows.append({"id": f"chat{i}", "messages": [{"role": "user", "content": _sentence(rng, 3)}],
                     "response": _sentence(rng, 4)})  # fmt: skip
        turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": _sentence(rng, 2)}]
        turns += [{"role": "assistant", "content": _sentence(rng, 3)}, {"role": "user", "content": _sentence(rng, 2)}]
        rows.append({"id": f"turns{i}", "messages": turns + [{"role": "assistant", "content": _sentence(rng, 5)}]})
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = runpy.run_path(str(REPO / "configs" / "hf.py"))["get_config"](f"{gemma},{gemma}")
    cfg.run.dir, cfg.data.corpus = str(tmp_path / "run"), str(tmp_path / "corpus.jsonl")
    run_stage("prepare", cfg)
    prepared = PreparedData(tmp_path / "run" / "prepared")
    assert prepared.manifest["tokenizer"]["end_of_turn_id"] == EOT
    tok = transformers.AutoTokenizer.from_pretrained(gemma)
    by_id = {r["id"]: r for r in rows}
    seen = 0
    for split in prepared.manifest["splits"]:
        for rec in prepared.iter_split(split):
            tokens, row, p = [int(t) for t in rec["tokens"]], by_id[rec["record_id"]], int(rec["prompt_len"])
            assert tokens[0] == BOS and tokens.count(BOS) == 1, tok.decode(tokens)
            if "prompt" in row:  # plain text: the tokenizer's <bos>, the eos after the answer
                assert tokens[:p] == tok(row["prompt"])["input_ids"] and tokens[-1] == EOS
            else:  # the template writes the <bos>; the answer ends as the template ends a turn
                turns = row["messages"] if "response" in row else row["messages"][:-1]
                want = tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=True, return_dict=False)
                assert tokens[:p] == list(want) and tokens[-1] == EOT and EOS not in tokens
            assert bool(rec["loss_mask"][-1])  # the end token is learned
            seen += 1
    assert seen == len(rows)


def test_serve_formats_chats_as_transformers_and_refuses_what_the_template_refuses(gemma):
    cfg = serve_config()
    cfg.path = str(gemma)
    backend = backends.load_backend(cfg)
    tok = transformers.AutoTokenizer.from_pretrained(gemma)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the dog sat"}]
    want = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert backend.chat_ids(chat) == list(want) and want.count(BOS) == 1
    assert set(backend.stop_ids) == {EOS, EOT}
    client = TestClient(make_app(backend), raise_server_exceptions=False)
    body = {"model": gemma.name, "max_tokens": 3, "temperature": 0}
    ok = client.post("/v1/chat/completions", json={**body, "messages": chat})
    assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] == len(want)
    twice = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]  # Gemma's roles must alternate
    refused = client.post("/v1/chat/completions", json={**body, "messages": twice})
    assert refused.status_code == 400, refused.json()
    error = refused.json()["error"]
    assert error["param"] == "messages" and "Conversation roles must alternate" in error["message"]
