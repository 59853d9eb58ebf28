"""Generation backends behind `serve`: a project Llama checkpoint, and a fast toy for wire tests.

Both follow the protocol in `server.py`: tokenizer methods plus one batched `complete` call.
"""

from __future__ import annotations

import functools
import hashlib
import pathlib
import time

import numpy as np

from proxykd_jax.errors import ProxyKDError
from proxykd_jax.models.tokenizer import chat_prompt, end_of_turn_id
from proxykd_jax.teacher.server import Completion
from proxykd_jax.teacher.token_bytes import drops_word_start_space, special_ids, token_byte_table

CONTEXT_TOKENS = 4  # tokens of context a token is spelled after (enough for word separators and byte merges)


def _next_pow2(x: int, floor: int = 1) -> int:
    return max(floor, 1 << max(0, int(x) - 1).bit_length())


def generation_shape(prompt_len: int, limit: int, max_tokens: int, context: int) -> tuple[int, int]:
    """(P, T): the padded prompt length and generated length of one `generate` call whose longest prompt has
    `prompt_len` tokens and whose largest row limit is `limit` (each row's limit is traced, `generate`'s
    `limits_B`). Both come from small sets (powers of two, `max_tokens`, the context less one of those or
    half of one), so a server compiles a few shapes, not one per prompt length.

    P + T stays within `context` where such a shape exists (always for rows that share one limit that fits:
    an explicit `max_tokens`); else (a prompt that runs to the context, padded) the cache holds more slots
    than the context (for one prompt: under half more, a quarter for a power-of-two context), while each
    row's positions stay within it.
    """
    t = min(max_tokens, _next_pow2(limit), context - 1)  # (a prompt has a token)
    p = min(_next_pow2(prompt_len, floor=8), context)
    if p + t <= context:
        return p, t
    if prompt_len + t <= context:  # the prompt padded to what the context leaves
        return context - t, t
    # no shape within the context: the padding of P or of T spills past it; the fewest slots of three shapes
    options = [(context - t // 2, t), (p, min(t, context - p // 2)), (p, t)]
    return min([(pp, tt) for pp, tt in options if pp >= prompt_len and tt >= limit], key=sum)


@functools.cache
def _row_keys_fn():
    """The jitted key builder of `LlamaBackend` (jax is imported only when a model is served)."""
    import jax  # pylint: disable=import-outside-toplevel

    @jax.jit
    def row_keys(base_key, call, seeded_R, hi_R, lo_R, sample_R):
        rows = jax.numpy.arange(seeded_R.shape[0], dtype=jax.numpy.uint32)

        def one(seeded, hi, lo, sample, row):
            from_seed = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(jax.random.key(0), hi), lo), sample)
            from_call = jax.random.fold_in(jax.random.fold_in(base_key, call), row)
            return jax.numpy.where(seeded, jax.random.key_data(from_seed), jax.random.key_data(from_call))

        return jax.random.wrap_key_data(jax.vmap(one)(seeded_R, hi_R, lo_R, sample_R, rows))

    return row_keys


class LlamaBackend:
    """A project `Llama` behind one jitted `generate` per call.

    Every call's sequences (prompts x n) are padded to a power-of-two batch and to a prompt and
    generated length from `generation_shape`, each row stopping at its own limit, so that a running
    server compiles a handful of shapes, not one per request mix or prompt length.
    """

    def __init__(self, model, tokenizer, *, model_name: str, seed: int = 0, stop_ids: tuple = ()):
        import jax  # pylint: disable=import-outside-toplevel

        self.model, self.tok, self.model_name = model, tokenizer, model_name
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise ValueError(
                f"the tokenizer of {model_name!r} has no eos token; set eos_token in its tokenizer_config.json"
            )
        # the eos, and the other tokens that end an answer (an instruct model's end of turn: `stop_ids`)
        self.stop_ids = (self.eos_id,) + tuple(t for t in stop_ids if t != self.eos_id)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.max_context = model.cfg.max_seq_len
        self.rules = None  # logical-axis rules of the model's mesh (the KV cache is split by them); None: default
        self._key = jax.random.key(seed)
        self._calls = 0
        self._byte_table = None  # token id -> bytes, built on first use
        self.special_ids = special_ids(tokenizer)  # left out of an answer's text, as vLLM and the OpenAI API do
        self._continues_prompt = drops_word_start_space(tokenizer)
        # the tokenizer's ids: those of an embedding padded past them are no token, never sampled nor listed
        self.vocab = min(len(tokenizer), model.cfg.vocab_size)

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=True))

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """The prompt `prepare` trains on for these messages (`models.tokenizer.chat_prompt`)."""
        text, special = chat_prompt(self.tok, messages)
        return list(self.tok.encode(text, add_special_tokens=special))

    def decode(self, ids: list[int]) -> str:
        """The text an answer of `ids` returns: `special_ids` left out. (The tokenizer decodes the ids that
        remain as its own `skip_special_tokens` would, which drops the tokens before its decoder runs.)"""
        return self._spell([i for i in map(int, ids) if i not in self.special_ids])

    def _spell(self, ids: list[int]) -> str:
        """`ids` decoded with every token spelled out, special ones included."""
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def prompt_context(self, prompt_ids: list[int]) -> list[int]:
        """The prompt's last tokens that an answer is spelled after, where a SentencePiece-style decoder
        would drop the space of its first word (`▁Hello` after "say" is " Hello", as vLLM returns it):
        the last `CONTEXT_TOKENS` that are not `special_ids` (none: a prompt of special tokens alone has
        no text to continue). Other tokenizers spell an answer alone: none."""
        if not self._continues_prompt:
            return []
        return [i for i in map(int, prompt_ids) if i not in self.special_ids][-CONTEXT_TOKENS:]

    def pieces(self, context_ids: list[int], candidate_ids: list[int]) -> list[str]:
        """Text each candidate adds after the context, decoded against its last `CONTEXT_TOKENS`
        tokens (exact for word-level and byte-level tokenizers). A special token's piece is its own
        text."""
        ctx = list(context_ids[-CONTEXT_TOKENS:])
        base = len(self._spell(ctx))
        return [self._spell(ctx + [int(c)])[base:] for c in candidate_ids]

    def token_bytes(self, context_ids: list[int], candidate_ids: list[int]) -> list[bytes]:
        """Each candidate's true bytes: from the tokenizer's byte mapping where it has one (exact
        for byte-level BPE, partial UTF-8 sequences included), else the UTF-8 of its piece."""
        if self._byte_table is None:
            self._byte_table = token_byte_table(self.tok)
        table = self._byte_table
        out = [table[c] if 0 <= c < len(table) else None for c in map(int, candidate_ids)]
        missing = [i for i, b in enumerate(out) if b is None]
        if missing:
            pieces = self.pieces(context_ids, [candidate_ids[i] for i in missing])
            for i, piece in zip(missing, pieces):
                out[i] = piece.encode("utf-8")
        return out

    def _row_keys(self, num_prompts: int, n: int, rows: int, seeds, starts=None):
        """One key per generated row: from the request's seed and the sample's index in its request (its
        prompt's start, `starts`, plus its index in the call) where it has one, else from this backend's
        key and the call counter."""
        seeded, hi, lo = np.zeros(rows, bool), np.zeros(rows, np.uint32), np.zeros(rows, np.uint32)
        sample = np.zeros(rows, np.uint32)
        for i in range(min(rows, num_prompts * n) if seeds is not None else 0):
            if seeds[i // n] is not None:  # any 64-bit seed, as two 32-bit words
                seed = int(seeds[i // n]) % (1 << 64)
                seeded[i], hi[i], lo[i] = True, seed >> 32, seed & 0xFFFFFFFF
                sample[i] = (starts[i // n] if starts is not None else 0) + i % n
        return _row_keys_fn()(self._key, np.uint32(self._calls), seeded, hi, lo, sample)

    def complete(
        self,
        prompts,
        *,
        n,
        temperature,
        top_p,
        max_tokens,
        logprobs,
        top_logprobs,
        seeds=None,
        starts=None,
        to_context=False,
    ):
        context = self.max_context
        limits = [min(max_tokens, context - len(p)) if to_context else max_tokens for p in prompts]
        shape = generation_shape(max(map(len, prompts)), max(limits), max_tokens, context)
        groups = {shape: list(range(len(prompts)))}
        if to_context and sum(shape) > context:  # long and short prompts to the context: each shape's own call,
            groups = {}  # so that the cache stays near the context (one shape for all would take up to twice it)
            for j, p in enumerate(prompts):
                groups.setdefault(generation_shape(len(p), limits[j], max_tokens, context), []).append(j)
        out = [None] * len(prompts)
        for shape, js in groups.items():
            rows = self._generate(
                [prompts[j] for j in js],
                [limits[j] for j in js],
                [seeds[j] for j in js] if seeds is not None else None,
                shape,
                starts=[starts[j] for j in js] if starts is not None else None,
                n=n,
                temperature=temperature,
                top_p=top_p,
                logprobs=logprobs,
                top_logprobs=top_logprobs,
            )
            for j, row in zip(js, rows):
                out[j] = row
        return out

    def _generate(self, prompts, limits, seeds, shape, *, starts, n, temperature, top_p, logprobs, top_logprobs):
        """n completions of each prompt, each at most its limit, in one `generate` call of `shape` (P, T)."""
        from proxykd_jax.models.sampling import generate  # pylint: disable=import-outside-toplevel

        seqs = [p for p in prompts for _ in range(n)]
        b, (p, t) = _next_pow2(len(seqs)), shape
        tokens_BxP = np.full((b, p), self.pad_id, np.int32)
        lengths_B, limits_B = np.ones((b,), np.int32), np.ones((b,), np.int32)  # padding rows: one token
        for i, s in enumerate(seqs):
            tokens_BxP[i, : len(s)], lengths_B[i], limits_B[i] = s, len(s), limits[i // n]
        self._calls += 1
        out = generate(
            self.model,
            tokens_BxP,
            lengths_B,
            self._row_keys(len(prompts), n, b, seeds, starts),
            max_new_tokens=t,
            limits_B=limits_B,
            temperature=temperature,
            top_p=top_p,
            stop_tokens=self.stop_ids,
            pad_id=self.pad_id,
            return_logprobs=bool(logprobs),
            top_logprobs=min(int(top_logprobs), self.vocab),  # a tiny vocabulary: all of it
            vocab=self.vocab,
            rules=self.rules,
        )
        toks_BxT, lens_B = np.asarray(out.tokens_BxT), np.asarray(out.lengths_B)
        lp_BxT = np.asarray(out.logprobs_BxT) if out.logprobs_BxT is not None else None
        top_ids = np.asarray(out.top_ids_BxTxN) if out.top_ids_BxTxN is not None else None
        top_lp = np.asarray(out.top_logprobs_BxTxN) if out.top_logprobs_BxTxN is not None else None
        results = []
        for i in range(len(seqs)):
            length = int(lens_B[i])
            stopped = length > 0 and int(toks_BxT[i, length - 1]) in self.stop_ids
            keep = length - 1 if stopped else length
            results.append(
                Completion(
                    token_ids=toks_BxT[i, :keep].tolist(),
                    finish_reason="stop" if stopped else "length",
                    logprobs=lp_BxT[i, :keep].tolist() if lp_BxT is not None else None,
                    top=[list(zip(top_ids[i, k].tolist(), top_lp[i, k].tolist())) for k in range(keep)]
                    if top_ids is not None
                    else None,
                )
            )
        return [results[j * n : (j + 1) * n] for j in range(len(prompts))]


class ToyBackend:
    """A deterministic byte-level "model" for exercising the wire (client, faults, batching).

    Token ids 0-255 are bytes, 256 is end-of-sequence. Each call draws, per sequence, a random
    distribution over lowercase letters and space at every step and samples from it (greedy at
    temperature 0, then the same for the same prompt on every call), so log-probs and alternatives
    are consistent. `latency_s` simulates the
    accelerator time of one batched call, which makes the server saturate like a real one.
    """

    EOS = 256
    ALPHABET = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz ", np.uint8).astype(np.int64)
    special_ids = frozenset({EOS})

    def __init__(self, model_name: str = "toy", seed: int = 0, latency_s: float = 0.0, max_context: int = 4096):
        self.model_name, self.seed, self.latency_s = model_name, seed, latency_s
        self.max_context = max_context
        self._calls = 0

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def chat_ids(self, messages: list[dict]) -> list[int]:
        return self.encode("".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:")

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def prompt_context(self, prompt_ids: list[int]) -> list[int]:
        del prompt_ids  # one byte per token: an answer is spelled alone
        return []

    def pieces(self, context_ids: list[int], candidate_ids: list[int]) -> list[str]:
        del context_ids  # one byte per token: pieces do not depend on the context
        return [self.decode([c]) for c in candidate_ids]

    def token_bytes(self, context_ids: list[int], candidate_ids: list[int]) -> list[bytes]:
        del context_ids
        return [bytes([c]) if c < 256 else b"" for c in candidate_ids]

    def _one(self, prompt: list[int], index: int, temperature: float, max_tokens: int, k: int, seed=None):
        call = self._calls if temperature > 0 else 0  # greedy decoding is reproducible
        if seed is not None and temperature > 0:  # a seeded request is reproducible too
            call = -1 - (int(seed) % (1 << 62))
        digest = hashlib.sha256(np.asarray(prompt + [index, call, self.seed]).tobytes())
        rng = np.random.default_rng(int.from_bytes(digest.digest()[:8], "little"))
        length = int(rng.integers(1, max_tokens + 1))
        logits_TxA = rng.normal(size=(length, len(self.ALPHABET))) * 2.0
        logp_TxA = logits_TxA - np.log(np.exp(logits_TxA).sum(-1, keepdims=True))
        if temperature == 0:
            pick_T = logp_TxA.argmax(-1)
        else:
            gumbel = -np.log(-np.log(rng.uniform(size=logp_TxA.shape)))
            pick_T = (logp_TxA / temperature + gumbel).argmax(-1)
        ids = self.ALPHABET[pick_T].tolist()
        order_TxA = np.argsort(-logp_TxA, axis=-1)[:, :k]
        top = [[(int(self.ALPHABET[a]), float(logp_TxA[t, a])) for a in order_TxA[t]] for t in range(length)]
        return Completion(
            ids, "stop" if length < max_tokens else "length", logp_TxA[np.arange(length), pick_T].tolist(), top
        )

    def complete(
        self,
        prompts,
        *,
        n,
        temperature,
        top_p,
        max_tokens,
        logprobs,
        top_logprobs,
        seeds=None,
        starts=None,
        to_context=False,
    ):
        del top_p  # the toy ignores nucleus truncation
        self._calls += 1
        if self.latency_s:
            time.sleep(self.latency_s)
        seeds, starts = seeds or [None] * len(prompts), starts or [0] * len(prompts)
        limits = [min(max_tokens, self.max_context - len(p)) if to_context else max_tokens for p in prompts]
        out = [  # a seeded prompt's samples numbered from its start in its request
            [
                self._one(p, j + (start if seed is not None else 0), temperature, limit, top_logprobs, seed)
                for j in range(n)
            ]
            for p, seed, start, limit in zip(prompts, seeds, starts, limits)
        ]
        if not logprobs:
            for row in out:
                for c in row:
                    c.logprobs, c.top = None, None
        return out


def load_backend(cfg, *, load_model=None, place=None):
    """The backend named by the `serve` group: a Hugging Face folder or a known-teacher folder.

    `load_model(folder, dtype=...) -> (config, model)` replaces `models.hf.load_hf` and `place(model)`
    places a known teacher's model (the `serve` stage puts both on its mesh)."""
    if cfg.source not in ("hf", "known"):
        raise ProxyKDError(f"serve.source must be 'hf' or 'known', not {cfg.source!r}")
    path = pathlib.Path(cfg.path).expanduser()
    if not cfg.path:
        raise ProxyKDError("serve.path is empty; set it to the model folder to serve (an `export` output)")
    if not path.is_dir():
        raise ProxyKDError(f"serve.path {cfg.path!r} is not a folder; point it at the model folder to serve")
    missing = [name for name in ("config.json",) if not (path / name).is_file()]
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        missing.append("tokenizer.json")
    if missing:
        raise ProxyKDError(
            f"serve.path {cfg.path!r} has no {' or '.join(missing)}; it must be a model folder written by "
            "`export` (or a Hugging Face Llama folder)"
        )
    name = cfg.model_name or path.name
    try:
        from proxykd_jax.models.hf import answer_stop_ids  # pylint: disable=import-outside-toplevel

        if cfg.source == "hf":
            from proxykd_jax.models.hf import generation_stop_ids, load_hf  # pylint: disable=import-outside-toplevel
            from proxykd_jax.models.tokenizer import load_tokenizer  # pylint: disable=import-outside-toplevel

            _, model = (load_model or load_hf)(path, dtype=cfg.dtype)
            tokenizer = load_tokenizer(path)
            # the folder's ids and its template's end of turn: a chat model served with its template ends turns
            # there, even where its folder lists the eos alone (a base model's, trained on templated answers)
            stops = answer_stop_ids(generation_stop_ids(path), end_of_turn_id(tokenizer))
            return LlamaBackend(model, tokenizer, model_name=name, seed=cfg.seed, stop_ids=stops)
        from proxykd_jax.teacher.known import KnownTeacher  # pylint: disable=import-outside-toplevel

        teacher = KnownTeacher.load(str(path))
        model = place(teacher.model) if place is not None else teacher.model
        stops = answer_stop_ids((), end_of_turn_id(teacher.tokenizer))
        return LlamaBackend(model, teacher.tokenizer, model_name=name, seed=cfg.seed, stop_ids=stops)
    except ProxyKDError:
        raise
    except (OSError, ValueError, KeyError) as err:  # a folder that is not a loadable model
        raise ProxyKDError(f"serve.path {cfg.path!r} cannot be served: {err}") from None
