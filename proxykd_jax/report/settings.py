"""Teacher–proxy pairs the report runs on, as a registry: a setting writes, into its folder,
`teacher/` (a KnownTeacher, the black box), `proxy_init/` (the open proxy, a Hugging Face folder
with the teacher's tokenizer) and returns the teacher. Adding a setting is one function and one
entry in `SETTINGS`.

* `specialised` (default): a general known model stands for public text; the teacher is that model
  specialised (`KnownTeacher.specialise`: perturbed weights and a style of favoured words); the
  proxy is pre-trained from a random init, by the project's own SFT path (collect -> prepare ->
  align with SFT only), on samples of the general model only: related to the teacher the way an
  open model is to a closed one.
* `perturbed`: the demo's pair, the proxy being the teacher's own weights with multiplicative noise.
* `chartok`: a teacher with its own tokenizer: a character-level known teacher whose corpus carries
  the top-20 log-probs of every character (the first-byte head, docs/TOKENIZERS.md); our byte-level
  BPE trained on its text; a randomly initialised proxy over our tokenizer, aligned by the SFT warm-up
  (`report.chartok_sft_steps`). Scores that need the teacher's tokenizer (KL to it, the white-box
  student, the proxies' KL) are "n/a (tokenizers differ)"; nats per byte are not.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
from collections.abc import Callable

import numpy as np

from proxykd_jax.errors import ProxyKDError
from proxykd_jax.eval import benchmark
from proxykd_jax.eval.folders import save_atomic


@dataclasses.dataclass(frozen=True)
class Setting:
    doc: str
    build: Callable  # (runner, folder) -> KnownTeacher; writes folder/teacher and folder/proxy_init
    same_tokenizer: bool = True  # False: the teacher's tokens are not ours (KL, white box: n/a)
    top_logprobs: bool = False  # whether the corpus carries the teacher's top log-probs (a teacher head)
    overrides: Callable | None = None  # (report config group) -> config overrides of every stage of a seed
    corpus: Callable | None = None  # (teacher, prompts, out, cfg, seed) -> writes the corpus; None: plain samples


def _perturbed(runner, folder):
    cfg = runner.cfg
    teacher = benchmark.make_teacher(cfg.demo, cfg.proxy, folder / "teacher")
    benchmark.perturbed_proxy(teacher, folder / "proxy_init", cfg.demo.proxy_noise, cfg.demo.teacher_seed + 1)
    return teacher


def _specialised(runner, folder):
    from proxykd_jax.teacher.known import KnownTeacher

    cfg, rcfg = runner.cfg, runner.cfg.report
    general = benchmark.make_teacher(cfg.demo, cfg.proxy, folder / "general")
    if (folder / "teacher" / "config.json").exists():
        teacher = KnownTeacher.load(str(folder / "teacher"))
    else:
        teacher = general.specialise(
            cfg.demo.teacher_seed + 7,
            noise=rcfg.specialise_noise,
            style_words=rcfg.style_words,
            style_boost=rcfg.style_boost,
        )
        save_atomic(lambda tmp: teacher.save(str(tmp)), folder / "teacher")
    if not (folder / "proxy_init" / "config.json").exists():
        pre = folder / "pretrain"
        prompts = pre / "prompts.jsonl"
        pre.mkdir(parents=True, exist_ok=True)
        benchmark.write_prompts(general, prompts, rcfg.general_prompts, cfg.demo.teacher_seed + 100)
        pctx = runner.sub_context(
            pre,
            prompts,
            folder / "general",
            {
                "align.sft_steps": rcfg.pretrain_steps,
                "align.sft_lr": rcfg.pretrain_lr,
                "align.rounds": 0,
                "proxy.init_from": "",
                "data.split.warmup": 0.85,
                "data.split.align": 0.05,
                "data.split.distill": 0.05,
                "data.split.heldout": 0.05,
            },
        )
        runner.collect_prepare(pctx, general)
        runner.stage("align", pctx, teacher_probs_fn=benchmark.teacher_probs_fn(teacher))
        save_atomic(lambda tmp: shutil.copytree(pre / "proxy" / "final", tmp), folder / "proxy_init")
    return teacher


def _chartok(runner, folder):
    from proxykd_jax.eval import per_byte
    from proxykd_jax.teacher.known import KnownTeacher

    cfg = runner.cfg
    if min(cfg.proxy.vocab_size, cfg.model.vocab_size) < 260:
        raise ProxyKDError(
            "report setting chartok gives the student a byte-level BPE: set proxy.vocab_size and model.vocab_size "
            f"to at least 260 (got {cfg.proxy.vocab_size} and {cfg.model.vocab_size})."
        )
    # each folder is saved atomically (eval.folders.save_atomic): a folder that exists is complete
    if not (folder / "teacher" / "config.json").exists():
        per_byte.char_teacher(
            cfg.demo.teacher_seed,
            folder / "teacher",
            vocab_size=benchmark.CHAR_TEACHER_VOCAB,
            d_model=cfg.demo.teacher_d_model,
            num_layers=cfg.demo.teacher_num_layers,
            proxy_cfg=cfg.proxy,
            target_entropy=cfg.demo.teacher_entropy,
        )
    teacher = KnownTeacher.load(str(folder / "teacher"), seed=cfg.demo.teacher_seed)
    if not (folder / "proxy_init" / "config.json").exists():
        tok = per_byte.bpe_from_teacher(
            teacher, folder / "bpe", int(cfg.proxy.vocab_size), texts=256, seed=cfg.demo.teacher_seed
        )
        per_byte.random_proxy(tok, cfg.proxy, folder / "proxy_init", cfg.demo.teacher_seed + 1)
    return teacher


def _chartok_overrides(rcfg) -> dict:
    """The first-byte head; a larger SFT split and warm-up: the proxy starts from a random init."""
    return {
        "data.teacher_head": "bytes",
        "align.sft_steps": int(rcfg.chartok_sft_steps),
        "data.split.warmup": 0.3,
        "data.split.align": 0.2,
        "data.split.distill": 0.4,
        "data.split.heldout": 0.1,
    }


def _chartok_corpus(teacher, prompts: pathlib.Path, out: pathlib.Path, cfg, seed: int) -> None:
    """The character teacher's answers with the top-20 log-probs (and bytes) of every character, one
    line per sample, as `collect` writes them from an API; written atomically, kept if it exists."""
    from proxykd_jax.eval import per_byte

    if out.exists():
        return
    rows = [json.loads(line) for line in prompts.read_text().splitlines() if line.strip()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    per_byte.write_corpus(
        teacher,
        [r["prompt"] for r in rows],
        tmp,
        samples=int(cfg.demo.samples_per_prompt),
        max_new_tokens=int(cfg.report.chartok_max_chars),
        top=20,
        seed=seed,
    )
    tmp.replace(out)


SETTINGS: dict[str, Setting] = {
    "specialised": Setting(
        "general model -> specialised teacher; proxy pre-trained on the general model's samples", _specialised
    ),
    "perturbed": Setting("proxy = the teacher's weights with multiplicative noise (the demo's pair)", _perturbed),
    "chartok": Setting(
        "character-level teacher (top-20 log-probs per character), our byte-level BPE student; "
        "proxy: random init over our tokenizer + SFT warm-up",
        _chartok,
        same_tokenizer=False,
        top_logprobs=True,
        overrides=_chartok_overrides,
        corpus=_chartok_corpus,
    ),
}


def kl_between(p_teacher, q_model, contexts) -> float:
    """Mean KL(p_teacher || q_model) over every position of `contexts` (two KnownTeachers)."""
    p = p_teacher.distributions(contexts).astype(np.float64)
    q = q_model.distributions(contexts).astype(np.float64)
    mask = np.zeros(p.shape[:2], bool)
    for i, c in enumerate(contexts):
        mask[i, : len(c)] = True
    kl = np.sum(p * (np.log(np.maximum(p, 1e-30)) - np.log(np.maximum(q, 1e-30))), -1)
    return float(kl[mask].mean())
