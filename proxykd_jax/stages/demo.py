"""`proxykd demo`: the whole pipeline on the built-in known-teacher setup (`eval/benchmark.py`).

The teacher is served over real HTTP on 127.0.0.1 by the project's own OpenAI-compatible server,
and the pipeline sees only what `collect` gets back: sampled text. Then, as a user would run them:
collect -> prepare -> prior -> align -> posterior -> distill (Proxy-KD and the alpha = 0 SFT
baseline, same steps and data, two artifacts) -> eval, which alone knows the teacher's true
distributions. Every stage is resumable: re-running the command after an interruption continues
where it stopped, and finished stages are reused.
"""

from __future__ import annotations

import logging

from proxykd_jax import stages
from proxykd_jax.errors import ProxyKDError
from proxykd_jax.eval import benchmark
from proxykd_jax.eval.metrics import format_table

log = logging.getLogger(__name__)


def _collect_over_http(ctx, teacher) -> None:
    from proxykd_jax.teacher.backends import LlamaBackend
    from proxykd_jax.teacher.listen import ServerThread
    from proxykd_jax.teacher.server import make_app

    if ctx.artifact("collect").done:
        stages.run_stage("collect", ctx)  # reuses the corpus
        return
    backend = LlamaBackend(teacher.model, teacher.tokenizer, model_name="known-teacher", seed=ctx.seed)
    with ServerThread(make_app(backend), host="127.0.0.1", port=0) as server:
        with ctx.cfg.unlocked():
            ctx.cfg.collect.base_url = server.base_url
        stages.run_stage("collect", ctx)


def run(ctx) -> dict:
    cfg, paths = ctx.cfg, ctx.paths
    if cfg.demo.teacher_tokenizer not in ("same", "char"):
        raise ProxyKDError(f"demo.teacher_tokenizer={cfg.demo.teacher_tokenizer!r} is not one of same, char.")
    if cfg.demo.teacher_tokenizer == "char" and min(cfg.proxy.vocab_size, cfg.model.vocab_size) < 260:
        raise ProxyKDError(
            "demo.teacher_tokenizer=char gives the student a byte-level BPE: set proxy.vocab_size and "
            "model.vocab_size to at least 260."
        )
    folder = paths.demo
    print(
        f"[demo] run directory {paths.root}; the teacher lives in {folder / 'teacher'} and is only reachable over HTTP"
    )
    art = ctx.artifact("demo")
    if not art.done:
        art.begin()
        benchmark.build(cfg.demo, cfg.proxy, art.work, ctx.seed)
        art.finish({"teacher": str(art.path / "teacher")})
    teacher = benchmark.make_teacher(cfg.demo, cfg.proxy, folder / "teacher")
    benchmark.demo_settings(cfg, folder)

    print("[demo] 1/7 collect: teacher responses over HTTP")
    _collect_over_http(ctx, teacher)
    print("[demo] 2/7 prepare")
    stages.run_stage("prepare", ctx)
    print("[demo] 3/7 prior")
    stages.run_stage("prior", ctx)
    print("[demo] 4/7 align the proxy (SFT, then DPO rounds)")
    same = cfg.demo.teacher_tokenizer != "char"  # a character teacher's distributions are over other tokens
    stages.run_stage("align", ctx, teacher_probs_fn=benchmark.teacher_probs_fn(teacher) if same else None)
    print("[demo] 5/7 posterior")
    stages.run_stage("posterior", ctx)
    print("[demo] 6/7 distill: Proxy-KD student, then the alpha = 0 SFT baseline")
    stages.run_stage("distill", ctx)
    sft = cfg.copy_and_resolve_references()
    sft.distill.loss.alpha = 0.0
    stages.run_stage("distill", ctx.with_config(sft))
    print("[demo] 7/7 eval against the known teacher")
    metrics = stages.run_stage("eval", ctx, teacher=teacher)
    results = paths.root / "results.md"
    if ctx.is_writer:
        results.write_text(format_table(metrics) + "\n")
    print(
        f"[demo] done: {results} (the ablation report over seeds and settings: proxykd report --config=configs/report.py)"
    )
    return metrics
