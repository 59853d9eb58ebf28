"""A tiny deterministic teacher whose full next-token distributions are known (the known-teacher
benchmark, docs/METHOD.md).

`KnownTeacher.create(seed)` builds a random Llama over a word vocabulary ("w0" .. "wN" plus the
specials <pad> <bos> <eos> <unk>) and reshapes its output layer so that its distributions are
sharp and structured: the lm_head is scaled until the mean next-token entropy on random contexts is
`target_entropy` nats (far below log V), and one residual channel is held constant (embedding
column 0 fixed, attention/MLP outputs into it zeroed) so that it acts as an output bias: <pad>,
<bos> and <unk> get probability ~0 and <eos> gets a mean probability of about `eos_rate`.

The pipeline only ever sees sampled text; the evaluator reads `distributions()`. Contexts are the
prompt's words followed by the response's words, no <bos>; the word tokenizer round-trips exactly, so
the pipeline's tokenisation of text equals the teacher's tokens.

`KnownTeacher.create(seed, tokenizer="char")` is the same teacher over single characters
(`CHAR_ALPHABET`: lowercase letters, space, punctuation and two-byte UTF-8 letters): a teacher with
its own tokenizer, whose API tokens are characters while the student's are byte-level BPE pieces
(docs/TOKENIZERS.md). Its text is scored per byte (`text_logprob`).
"""

from __future__ import annotations

import dataclasses
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from proxykd_jax.errors import ProxyKDError
from proxykd_jax.models import hf
from proxykd_jax.models.llama import Llama, ModelConfig
from proxykd_jax.models.sampling import generate
from proxykd_jax.models.tokenizer import SPECIAL_TOKENS, _wrap_and_save, build_word_tokenizer, load_tokenizer

_BLOCKED_LOGIT = -1000.0  # weight on the constant channel for <pad> <bos> <unk>
# The character teacher's alphabet (é, ü, ß, ø are two UTF-8 bytes each; the first 60 characters).
CHAR_ALPHABET = "etaoinshrdlucmfwypvbgkqjxz ,.éüßø" + "ETAOINSHRDLUCMFWYPVBGKQJXZ!?;:'-0123456789"
TOKENIZERS = ("word", "char")


def build_char_tokenizer(chars, folder=None):
    """A tokenizer with one token per character of `chars` (ids 4.. in order); decoding concatenates."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = list(dict.fromkeys(chars))
    if any(len(c) != 1 or c == "\n" for c in chars):
        raise ValueError("build_char_tokenizer takes single characters other than newline.")
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    vocab.update({c: i + len(SPECIAL_TOKENS) for i, c in enumerate(chars)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return _wrap_and_save(tok, folder)


@nnx.jit
def _hidden(model, tokens_BxL):
    return model.hidden(tokens_BxL)


@nnx.jit
def _probs(model, tokens_BxL, segment_ids_BxL):
    return jax.nn.softmax(model(tokens_BxL, segment_ids_BxL=segment_ids_BxL), axis=-1)


def _log_softmax(logits_NxV: np.ndarray) -> np.ndarray:
    z = logits_NxV - logits_NxV.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _entropy(logits_NxV: np.ndarray) -> float:
    logp = _log_softmax(logits_NxV)
    return float(np.mean(-np.sum(np.exp(logp) * logp, axis=-1)))


def _bisect(fn, target, lo, hi, increasing, steps=40):
    """Finds x in [lo, hi] with fn(x) ~= target for a monotone fn (geometric bisection when lo > 0)."""
    for _ in range(steps):
        mid = (lo * hi) ** 0.5 if lo > 0 else (lo + hi) / 2
        if (fn(mid) < target) == increasing:
            lo = mid
        else:
            hi = mid
    return (lo * hi) ** 0.5 if lo > 0 else (lo + hi) / 2


@dataclasses.dataclass
class KnownTeacher:
    model: Llama
    model_config: ModelConfig
    tokenizer: object
    seed: int

    @classmethod
    def create(
        cls,
        seed: int,
        *,
        vocab_size: int = 256,
        d_model: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        num_kv_heads: int = 2,
        d_ff: int = 128,
        max_seq_len: int = 256,
        target_entropy: float = 1.5,
        eos_rate: float = 0.04,
        folder=None,
        tokenizer: str = "word",
    ) -> KnownTeacher:
        """Builds the teacher deterministically from `seed`; the tokenizer goes to `folder` (or a temp dir).

        tokenizer: "word" (words w0, w1, ...; the demo's student tokenizes the same way) or "char"
        (one token per character of `CHAR_ALPHABET`, its first vocab_size - 4 characters)."""
        if tokenizer not in TOKENIZERS:
            raise ValueError(f"KnownTeacher tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}.")
        if tokenizer == "char" and vocab_size > len(SPECIAL_TOKENS) + len(CHAR_ALPHABET):
            raise ValueError(
                f"a character teacher has at most {len(SPECIAL_TOKENS) + len(CHAR_ALPHABET)} tokens, got vocab_size={vocab_size}."
            )
        if vocab_size < len(SPECIAL_TOKENS) + 4:
            raise ValueError(f"KnownTeacher vocab_size must be at least {len(SPECIAL_TOKENS) + 4}, got {vocab_size}.")
        if not 0 < target_entropy < np.log(vocab_size - len(SPECIAL_TOKENS)):
            raise ValueError(f"target_entropy must be in (0, log of the word count), got {target_entropy}.")
        folder = pathlib.Path(folder) if folder is not None else pathlib.Path(tempfile.mkdtemp(prefix="known_teacher_"))
        n_words = vocab_size - len(SPECIAL_TOKENS)
        if tokenizer == "char":
            tok = build_char_tokenizer(CHAR_ALPHABET[:n_words], folder)
        else:
            tok = build_word_tokenizer([f"w{i}" for i in range(n_words)], folder)
        cfg = ModelConfig(
            vocab_size=vocab_size,
            d_model=d_model,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=d_model // num_heads,
            d_ff=d_ff,
            max_seq_len=max_seq_len,
        )
        model = Llama(cfg, rngs=nnx.Rngs(seed))
        teacher = cls(model=model, model_config=cfg, tokenizer=tok, seed=seed)
        teacher._shape_output(target_entropy, eos_rate)
        return teacher

    def specialise(self, seed: int, *, noise: float, style_words: int, style_boost: float) -> KnownTeacher:
        """This model specialised toward a style of its own (a closed model fine-tuned from an open one).

        Weights get multiplicative noise `noise * N(0, 1)` (the constant channel stays constant), and
        `style_words` random words get `style_boost` nats more logit everywhere (a bias on the
        constant channel): a different model of the same family, with the same tokenizer."""
        rng = np.random.default_rng(seed)
        graphdef, state = nnx.split(self.model)
        leaves, treedef = jax.tree.flatten(state)
        noisy = [np.asarray(x) * (1 + noise * rng.standard_normal(x.shape)) for x in leaves]
        model = nnx.merge(
            graphdef, jax.tree.unflatten(treedef, [jnp.asarray(x, np.asarray(y).dtype) for x, y in zip(noisy, leaves)])
        )
        model.embedding[...] = model.embedding[...].at[:, 0].set(1.0)
        words = rng.choice(np.arange(len(SPECIAL_TOKENS), self.model_config.vocab_size), style_words, replace=False)
        model.lm_head[...] = model.lm_head[...].at[0, words].add(style_boost)
        return KnownTeacher(model=model, model_config=self.model_config, tokenizer=self.tokenizer, seed=seed)

    @classmethod
    def load(cls, folder, seed: int = -1) -> KnownTeacher:
        """Reads a teacher written by `save`."""
        cfg, model = hf.load_hf(folder)
        return cls(model=model, model_config=cfg, tokenizer=load_tokenizer(folder), seed=seed)

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_token_id

    def _shape_output(self, target_entropy: float, eos_rate: float) -> None:
        m, cfg = self.model, self.model_config
        m.embedding[...] = m.embedding[...].at[:, 0].set(1.0)  # the constant channel
        m.layers.attn.wo[...] = m.layers.attn.wo[...].at[..., 0].set(0.0)  # stacked [layers, ...]
        m.layers.mlp.w_down[...] = m.layers.mlp.w_down[...].at[..., 0].set(0.0)
        rng = np.random.default_rng(self.seed)
        n_special = len(SPECIAL_TOKENS)
        contexts = rng.integers(n_special, cfg.vocab_size, (32, min(32, cfg.max_seq_len)))
        hidden_NxD = np.asarray(_hidden(m, jnp.asarray(contexts)), np.float64).reshape(-1, cfg.d_model)
        head_DxV = np.array(m.lm_head[...], np.float64)
        head_DxV[0] = 0.0
        words = [i for i in range(cfg.vocab_size) if i >= n_special or i == self.eos_id]
        base_NxW = hidden_NxD @ head_DxV[:, words]
        scale = _bisect(lambda s: _entropy(s * base_NxW), target_entropy, 1e-3, 1e3, increasing=False)
        head_DxV *= scale
        blocked = [i for i in range(n_special) if i != self.eos_id]
        head_DxV[:, blocked] = 0.0
        head_DxV[0, blocked] = _BLOCKED_LOGIT
        logits_NxV = hidden_NxD @ head_DxV
        eos_channel_N = hidden_NxD[:, 0]

        def mean_eos_prob(offset):
            shifted = logits_NxV.copy()
            shifted[:, self.eos_id] += offset * eos_channel_N
            return float(np.mean(np.exp(_log_softmax(shifted)[:, self.eos_id])))

        head_DxV[0, self.eos_id] += _bisect(mean_eos_prob, eos_rate, -200.0, 200.0, increasing=True)
        m.lm_head[...] = jnp.asarray(head_DxV, m.lm_head[...].dtype)

    # ------------------------------------------------------------------------------------------

    @property
    def is_char(self) -> bool:
        """Whether this teacher's tokens are single characters."""
        return self.tokenizer.convert_ids_to_tokens(len(SPECIAL_TOKENS)) == CHAR_ALPHABET[0]

    def make_prompts(self, n: int, rng: np.random.Generator, *, min_words: int = 4, max_words: int = 12) -> list[str]:
        """`n` prompts of uniformly random words (of the character teacher: random tokens, 3x as many)."""
        n_special = len(SPECIAL_TOKENS)
        if self.is_char:
            lengths = rng.integers(3 * min_words, 3 * max_words + 1, n)
            return [
                self.tokenizer.decode(rng.integers(n_special, self.model_config.vocab_size, k).tolist())
                for k in lengths
            ]
        lengths = rng.integers(min_words, max_words + 1, n)
        return [
            " ".join(f"w{i - n_special}" for i in rng.integers(n_special, self.model_config.vocab_size, k))
            for k in lengths
        ]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def sample(
        self,
        prompts: list[str],
        n_per_prompt: int,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        seed: int = 0,
        batch_size: int = 64,
    ) -> list[list[str]]:
        """`n_per_prompt` responses per prompt (text without <eos>); a response ends at <eos> or max length."""
        answers = self.sample_finished(
            prompts, n_per_prompt, max_new_tokens, temperature=temperature, seed=seed, batch_size=batch_size
        )
        return [[text for text, _ in group] for group in answers]

    def sample_finished(
        self,
        prompts: list[str],
        n_per_prompt: int,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        seed: int = 0,
        batch_size: int = 64,
    ) -> list[list[tuple[str, str]]]:
        """`sample`'s responses, each with its finish reason as an API gives it: "stop" where the
        teacher sampled <eos>, "length" where `max_new_tokens` cut it (`prepare` adds no eos target there)."""
        rows = [self.encode(p) for p in prompts for _ in range(n_per_prompt)]
        if any(not r for r in rows):
            raise ValueError("KnownTeacher.sample got an empty prompt; every prompt needs at least one word.")
        longest = max(len(r) for r in rows)  # rounded up to 16 (few shapes, few compilations) within the context
        width = max(longest, min(-(-longest // 16) * 16, self.model_config.max_seq_len - max_new_tokens))
        answers = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            tokens = np.zeros((batch_size, width), np.int32)
            lengths = np.ones((batch_size,), np.int32)
            for i, r in enumerate(chunk):
                tokens[i, : len(r)], lengths[i] = r, len(r)
            out = generate(
                self.model,
                tokens,
                lengths,
                jax.random.fold_in(jax.random.key(seed), start),
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                stop_tokens=(self.eos_id,),
            )
            gen, lens = np.asarray(out.tokens_BxT), np.asarray(out.lengths_B)
            for i in range(len(chunk)):
                ids = gen[i, : lens[i]].tolist()
                stopped = bool(ids) and ids[-1] == self.eos_id  # as LlamaBackend decides it
                text = self.tokenizer.decode([t for t in ids if t != self.eos_id])
                answers.append((text, "stop" if stopped else "length"))
        return [answers[i * n_per_prompt : (i + 1) * n_per_prompt] for i in range(len(prompts))]

    def corpus_rows(
        self, ids: list[str], prompts: list[str], n_per_prompt: int, max_new_tokens: int, *, seed: int
    ) -> list[dict]:
        """Sampled answers to `prompts` (named `ids`) as corpus lines, one per sample as `collect` writes
        them: id, prompt, response, sample_index, meta (max_tokens, finish_reason: "length" where
        max_new_tokens cut the answer, so `prepare` puts no eos target after it). An immediate <eos>
        is no usable text and is left out; the sample indices number the answers kept."""
        answers = self.sample_finished(prompts, n_per_prompt, max_new_tokens, seed=seed)
        return [
            {
                "id": i,
                "prompt": p,
                "response": text,
                "sample_index": j,
                "meta": {"max_tokens": max_new_tokens, "finish_reason": finish},
            }
            for i, p, group in zip(ids, prompts, answers)
            for j, (text, finish) in enumerate(x for x in group if x[0].strip())
        ]

    def distributions(self, context_token_ids, lengths=None) -> np.ndarray:
        """True next-token distributions float32 [B, L, V] at every position of each context.

        `context_token_ids` is a list of token lists (ragged) or a right-padded [B, L] array with
        `lengths`; positions at or beyond a row's length hold the (meaningless) padding forward.
        """
        if lengths is None:
            lengths = [len(c) for c in context_token_ids]
            width = max(lengths)
            tokens = np.zeros((len(context_token_ids), width), np.int32)
            for i, c in enumerate(context_token_ids):
                tokens[i, : len(c)] = c
        else:
            tokens = np.asarray(context_token_ids, np.int32)
        lengths = np.asarray(lengths)
        segments = (np.arange(tokens.shape[1])[None] < lengths[:, None]).astype(np.int32)
        return np.asarray(_probs(self.model, jnp.asarray(tokens), jnp.asarray(segments)))

    def _check_prompts(self, prompts: list[str], caller: str) -> None:
        """Refuses a prompt with no tokens: its text's first token would have no context to be scored in."""
        empty = [i for i, p in enumerate(prompts) if not self.encode(p)]
        if empty:
            raise ProxyKDError(
                f"KnownTeacher.{caller} got an empty prompt (index {empty[0]}); every prompt needs at least one token."
            )

    def sequence_logprobs(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        """Teacher log-likelihood of each response given its prompt (sum over response tokens), float64 [B]."""
        self._check_prompts(prompts, "sequence_logprobs")
        contexts = [self.encode(p) + self.encode(r) for p, r in zip(prompts, responses)]
        probs = self.distributions([c[:-1] if len(c) > 1 else c for c in contexts])
        out = np.zeros(len(contexts))
        for i, (p, c) in enumerate(zip(prompts, contexts)):
            start = len(self.encode(p))
            targets = c[start:]
            out[i] = np.sum(
                np.log(probs[i, np.arange(start - 1, start - 1 + len(targets)), targets].astype(np.float64))
            )
        return out

    def text_logprob(self, prompts: list[str], texts: list[str], ended=None) -> tuple[np.ndarray, np.ndarray]:
        """(teacher log-likelihood of each text after its prompt, float64 [B]; UTF-8 bytes of each text).

        The text is scored as the teacher tokenises it, followed by <eos> where it `ended` (default: every
        text; not a text cut at a length limit, whose writer went on) so nats per byte compare across
        tokenizers. The <eos> adds no byte (eval/per_byte.py `text_bytes`: the convention). Each token's
        probability is floored at 1e-30: a token the teacher gives (float32) zero, such as a character outside
        its alphabet, costs 69 nats instead of making the score infinite. The bytes are each text's UTF-8 bytes,
        3 for a replacement character: the text and bytes of tokens that are not UTF-8 (a generation cut inside a
        character) are eval/per_byte.py `generation_text`'s."""
        ended = [True] * len(texts) if ended is None else [bool(e) for e in ended]
        self._check_prompts(prompts, "text_logprob")
        contexts = [
            self.encode(p) + self.encode(t) + ([self.eos_id] if e else []) for p, t, e in zip(prompts, texts, ended)
        ]
        probs = self.distributions([c[:-1] if len(c) > 1 else c for c in contexts])
        out = np.zeros(len(contexts))
        for i, (p, c) in enumerate(zip(prompts, contexts)):
            start = len(self.encode(p))
            targets = c[start:]
            rows = np.arange(start - 1, start - 1 + len(targets))
            out[i] = np.sum(np.log(np.maximum(probs[i, rows, targets].astype(np.float64), 1e-30)))
        return out, np.asarray([len(t.encode("utf-8")) for t in texts], np.int64)

    def save(self, folder) -> None:
        """Writes an HF folder (weights, config, tokenizer) that `serve` and `transformers` load."""
        hf.save_hf(self.model, self.model_config, folder, tokenizer=self.tokenizer)
