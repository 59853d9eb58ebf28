"""Tokenizers: load a local Hugging Face tokenizer, build tiny word-level and byte-level BPE ones.

Built tokenizers are saved as `PreTrainedTokenizerFast` folders that `AutoTokenizer` loads offline.
Special tokens are `<pad>`=0, `<bos>`=1, `<eos>`=2, `<unk>`=3; `encode` adds none of them. `tokenizers` and
`transformers` are imported where a tokenizer is loaded or built: config checks import this module for its
names alone, and transformers imports torch where it is installed (seconds).
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (annotations only)
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

try:  # what a chat template raises for messages it refuses (`raise_exception`, an empty chat, a bad field)
    from jinja2.exceptions import TemplateError as _JinjaError
except ImportError:  # pragma: no cover  (jinja2 comes with transformers' chat templates)
    _JinjaError = ValueError

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
TEMPLATE_ERRORS = (_JinjaError, ValueError, TypeError, KeyError, IndexError, AttributeError)
# Messages joined by single spaces: with the word tokenizer, a chat prompt tokenises exactly like its words.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['content'] }}{% if not loop.last %} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %} {% endif %}"
)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")  # a folder holding one has a tokenizer


def has_tokenizer(folder) -> bool:
    """Whether `folder` holds a tokenizer (one of `TOKENIZER_FILES`), as a model's Hugging Face folder often does."""
    return any((pathlib.Path(folder) / name).exists() for name in TOKENIZER_FILES)


def load_tokenizer(folder):
    """Loads a tokenizer from a local folder (never from the network)."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Tokenizer folder {folder} does not exist; pass a local folder holding tokenizer.json."
        )
    if not has_tokenizer(folder):
        raise FileNotFoundError(
            f"Tokenizer folder {folder} has no tokenizer.json, tokenizer_config.json or tokenizer.model; "
            "save a tokenizer there with tokenizer.save_pretrained(folder)."
        )
    try:
        config_file = folder / "tokenizer_config.json"
        declared = json.loads(config_file.read_text()).get("tokenizer_class") if config_file.exists() else None
        if declared in ("TokenizersBackend", "PreTrainedTokenizerFast") and (folder / "tokenizer.json").exists():
            # A generic tokenizer.json: AutoTokenizer would swap in the model type's class (e.g. Qwen2Tokenizer
            # beside a qwen2 config.json), which re-builds the pre-tokenizer; load it as written instead. Importing
            # AutoTokenizer alone costs about 2 s (it imports every model config, and torch where it is installed).
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # pylint: disable=broad-except  # json, the tokenizers library and transformers each
        # raise their own (tokenizers: a bare Exception) for files that do not parse
        if isinstance(e, (ImportError, MemoryError)):
            raise
        from proxykd_jax.errors import InputFileError

        if folder.name == "tokenizer" and (folder.parent / "manifest.json").exists():  # prepare's copy
            fix = f"delete {folder.parent} and re-run `proxykd prepare` (with --config.run.overwrite=True)"
        else:
            fix = "fix or replace its files (a tokenizer saved with tokenizer.save_pretrained(folder) loads)"
        detail = " ".join(str(e).split())[:300] or type(e).__name__
        raise InputFileError(f"{folder}: the tokenizer cannot be loaded ({type(e).__name__}: {detail}); {fix}.") from e


def chat_prompt(tokenizer, messages: list[dict]) -> tuple[str, bool]:
    """(prompt text, whether the tokenizer should add its special tokens) of chat `messages`: the tokenizer's
    chat template with the generation prompt, else `role: content` lines and "assistant: ". prepare formats
    training prompts and serve formats requests with it, so a served model sees what it was trained on."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), False
    return "\n".join([f"{m['role']}: {m['content']}" for m in messages] + ["assistant: "]), True


# The content of the probe conversation's answer: text no template writes around a message by itself.
_TURN_PROBE = "proxykd-end-of-turn-probe"


def end_of_turn_id(tokenizer) -> int | None:
    """The id of the token the tokenizer's chat template writes right after an assistant message's content: the
    token that ends an answer in a chat (Llama 3's <|eot_id|>, whose eos is <|end_of_text|>; Qwen's <|im_end|>,
    its eos too). Found by rendering a probe conversation (a user message and an answer holding a marker, no
    generation prompt) and tokenising what follows the marker; its first token counts when it is a special or
    added token that is not whitespace. Else, for a template that writes nothing or ordinary text after a
    message (this module's CHAT_TEMPLATE), refuses the probe, or without a template: the eos (None without one).
    Costs one render: callers find it once per tokenizer, and again when its chat template changes."""
    eos = tokenizer.eos_token_id
    if not getattr(tokenizer, "chat_template", None):
        return eos
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _TURN_PROBE}]
    try:
        text = tokenizer.apply_chat_template(probe, add_generation_prompt=False, tokenize=False)
    except TEMPLATE_ERRORS:  # a template that refuses the probe (its own checks): the eos, as without one
        return eos
    at = text.rfind(_TURN_PROBE) if isinstance(text, str) else -1
    after = text[at + len(_TURN_PROBE) :] if at >= 0 else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    if not ids:
        return eos
    first = int(ids[0])
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    special = first in set(getattr(tokenizer, "all_special_ids", ()) or ()) or first in added
    piece = tokenizer.convert_ids_to_tokens(first)
    # (<unk>: text a word-level vocabulary does not hold, not a token the template names)
    return first if special and first != tokenizer.unk_token_id and piece and piece.strip() else eos


def _wrap_and_save(tok: Tokenizer, folder) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    if folder is not None:
        pathlib.Path(folder).mkdir(parents=True, exist_ok=True)
        fast.save_pretrained(str(folder))
    return fast


def build_word_tokenizer(words, folder=None) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over `words` (split on whitespace; ids 4.. in the given order).

    Decoding joins tokens with single spaces, so decode(encode(text)) == text for text made of
    known words separated by single spaces. Saved to `folder` when given.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = list(dict.fromkeys(words))
    # (the decoder glues a word starting with "##" onto the one before it)
    clash = [w for w in words if w in SPECIAL_TOKENS or not w or any(c.isspace() for c in w) or w.startswith("##")]
    if clash:
        raise ValueError(
            f"Word list holds special tokens, empty words, words with spaces or starting with '##': {clash[:5]}."
        )
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    vocab.update({w: i + len(SPECIAL_TOKENS) for i, w in enumerate(words)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins tokens with spaces, nothing else
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return _wrap_and_save(tok, folder)


def build_bpe_tokenizer(texts, vocab_size: int, folder=None) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `texts` (any string round-trips); vocab_size >= 260."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"Byte-level BPE needs vocab_size >= {256 + len(SPECIAL_TOKENS)}, got {vocab_size}.")
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return _wrap_and_save(tok, folder)


def vocabulary_difference(ours, theirs) -> str:
    """The first id that tokenizer `theirs` reads as another token than `ours` does, in words; "" where they agree
    on every id both hold (one may extend the other with added tokens, as Qwen3's is Qwen2.5's and four more, and
    their chat templates may differ)."""
    mine = {i: t for t, i in ours.get_vocab().items()}
    other = {i: t for t, i in theirs.get_vocab().items()}
    for i in range(min(len(ours), len(theirs))):
        if mine.get(i) != other.get(i):
            return f"id {i} is {other.get(i)!r} there and {mine.get(i)!r} in the run's"
    return ""


def tokenizer_hash(tok) -> str:
    """Stable sha256 (hex, 16 chars) of the vocabulary and the special tokens, and of the chat template's end of
    turn (`end_of_turn_id`) where it is not the eos: prepared records end chat answers with it."""
    payload = {
        "vocab": sorted(tok.get_vocab().items(), key=lambda kv: kv[1]),
        "special": sorted((k, str(v)) for k, v in tok.special_tokens_map.items()),
    }
    turn_end = end_of_turn_id(tok)
    if turn_end != tok.eos_token_id:  # (left out otherwise: the hashes of such tokenizers stay what they were)
        payload["end_of_turn"] = turn_end
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()[:16]
