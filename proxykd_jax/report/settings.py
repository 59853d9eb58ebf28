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
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable

import numpy as np

from proxykd_jax.eval import benchmark


@dataclasses.dataclass(frozen=True)
class Setting:
    doc: str
    build: Callable  # (runner, folder) -> KnownTeacher; writes folder/teacher and folder/proxy_init


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
        tmp = folder / "teacher.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        teacher.save(str(tmp))
        tmp.rename(folder / "teacher")
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
        tmp = folder / "proxy_init.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(pre / "proxy" / "final", tmp)
        tmp.rename(folder / "proxy_init")
    return teacher


SETTINGS: dict[str, Setting] = {
    "specialised": Setting(
        "general model -> specialised teacher; proxy pre-trained on the general model's samples", _specialised
    ),
    "perturbed": Setting("proxy = the teacher's weights with multiplicative noise (the demo's pair)", _perturbed),
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
