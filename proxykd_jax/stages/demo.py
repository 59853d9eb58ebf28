"""`proxykd demo`: the whole pipeline on the built-in known-teacher setup (DESIGN.md §5).

The "black-box" teacher is a tiny Llama built from a seed (`teacher.known`); it is
served over real HTTP on 127.0.0.1 by the project's own OpenAI-compatible server,
and the pipeline sees only what `collect` gets back: sampled text. The open proxy
is the teacher's architecture with perturbed weights (a stand-in for "an open
model of a related family"); the student is smaller. Then, as a user would run
them: collect -> prepare -> prior -> align -> posterior -> distill (Proxy-KD and
the alpha = 0 SFT baseline, same steps and data) -> eval, which alone knows the
teacher's true distributions. Every stage is resumable: re-running the command
after an interruption continues where it stopped.
"""

from __future__ import annotations

import json
import logging
import pathlib

import jax
import ml_collections
import numpy as np
from flax import nnx

from proxykd_jax.models import hf
from proxykd_jax.stages.paths import RunPaths

log = logging.getLogger(__name__)


def default_config() -> ml_collections.ConfigDict:
    """Defaults of the `demo` group: the known teacher and the collected corpus."""
    cd = ml_collections.ConfigDict()
    cd.teacher_seed = 1234  # seed the known teacher is built from
    cd.teacher_d_model = 64  # teacher width (the proxy has the teacher's shape: config.proxy)
    cd.teacher_num_layers = 2  # teacher depth
    cd.teacher_entropy = 1.5  # mean next-token entropy of the teacher (nats)
    cd.num_prompts = 400  # prompts sent to the teacher
    cd.samples_per_prompt = 4  # teacher responses per prompt (informs the per-prompt tries)
    cd.max_new_tokens = 24  # longest teacher response
    cd.proxy_noise = 0.15  # proxy init = teacher weights * (1 + proxy_noise * N(0, 1)), element-wise
    return cd


def _teacher(cfg, folder: pathlib.Path):
    from proxykd_jax.teacher.known import KnownTeacher

    if (folder / "config.json").exists():
        return KnownTeacher.load(str(folder))
    d = cfg.demo
    teacher = KnownTeacher.create(
        d.teacher_seed,
        vocab_size=cfg.proxy.vocab_size,
        d_model=d.teacher_d_model,
        num_layers=d.teacher_num_layers,
        num_heads=cfg.proxy.num_heads,
        num_kv_heads=cfg.proxy.num_kv_heads,
        d_ff=cfg.proxy.d_ff,
        max_seq_len=cfg.proxy.max_seq_len,
        target_entropy=d.teacher_entropy,
        folder=folder / "tokenizer_build",
    )
    teacher.save(str(folder))
    return teacher


def _write_prompts(teacher, path: pathlib.Path, n: int, seed: int) -> None:
    if path.exists():
        return
    prompts = teacher.make_prompts(n, np.random.default_rng(seed))
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"id": f"p{i:05d}", "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    tmp.rename(path)


def _perturbed_proxy(teacher, folder: pathlib.Path, noise: float, seed: int) -> None:
    """The demo's open proxy: the teacher's weights with multiplicative Gaussian noise.

    Multiplicative noise keeps the teacher's structure (blocked special tokens stay blocked) while
    moving every distribution: at 0.15 the proxy starts about 1.5 nats of KL from the teacher.
    """
    if (folder / "config.json").exists():
        return
    graphdef, state = nnx.split(teacher.model)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x * (1 + noise * jax.random.normal(k, x.shape, x.dtype)) for x, k in zip(leaves, keys)]
    proxy = nnx.merge(graphdef, jax.tree.unflatten(treedef, noisy))
    hf.save_hf(proxy, teacher.model_config, str(folder), tokenizer=teacher.tokenizer)


def _teacher_probs_fn(teacher):
    def probs(tokens_BxL, segment_ids_BxL):
        return teacher.distributions(np.asarray(tokens_BxL), np.asarray((np.asarray(segment_ids_BxL) > 0).sum(1)))

    return probs


def _collect_over_http(cfg, teacher) -> None:
    from proxykd_jax.stages import collect
    from proxykd_jax.teacher.backends import LlamaBackend
    from proxykd_jax.teacher.server import ServerThread, make_app

    backend = LlamaBackend(teacher.model, teacher.tokenizer, model_name="known-teacher", seed=cfg.run.seed)
    with ServerThread(make_app(backend), host="127.0.0.1", port=0) as server:
        with cfg.unlocked():
            cfg.collect.base_url = server.base_url
        collect.run(cfg)


def run(cfg) -> dict:
    from proxykd_jax.stages import align, distill, posterior, prepare, prior
    from proxykd_jax.stages import eval as eval_stage

    paths = RunPaths.from_config(cfg)
    paths.root.mkdir(parents=True, exist_ok=True)
    teacher_dir, proxy_init = paths.root / "teacher", paths.root / "proxy_init"
    print(f"[demo] run directory {paths.root}; the teacher lives in {teacher_dir} and is only reachable over HTTP")
    teacher = _teacher(cfg, teacher_dir)
    _write_prompts(teacher, paths.root / "prompts.jsonl", cfg.demo.num_prompts, cfg.run.seed)
    _perturbed_proxy(teacher, proxy_init, cfg.demo.proxy_noise, cfg.run.seed + 1)
    with cfg.unlocked():
        cfg.collect.prompts = str(paths.root / "prompts.jsonl")
        cfg.collect.model = "known-teacher"
        cfg.collect.api = "completions"
        cfg.collect.samples_per_prompt = cfg.demo.samples_per_prompt
        cfg.collect.max_tokens = cfg.demo.max_new_tokens
        cfg.data.tokenizer = str(proxy_init)
        cfg.proxy.init_from = str(proxy_init)
        cfg.eval.known_teacher = str(teacher_dir)

    print("[demo] 1/7 collect: teacher responses over HTTP")
    _collect_over_http(cfg, teacher)
    print("[demo] 2/7 prepare")
    prepare.run(cfg)
    print("[demo] 3/7 prior")
    prior.run(cfg)
    print("[demo] 4/7 align the proxy (SFT, then DPO rounds)")
    align.run(cfg, teacher_probs_fn=_teacher_probs_fn(teacher))
    print("[demo] 5/7 posterior")
    posterior.run(cfg)
    print("[demo] 6/7 distill: Proxy-KD student, then the alpha = 0 SFT baseline")
    distill.run(cfg)
    sft = cfg.copy_and_resolve_references()
    sft.distill.loss.alpha = 0.0
    distill.run(sft)
    print("[demo] 7/7 eval against the known teacher")
    metrics = eval_stage.run(cfg, teacher=teacher)
    results = paths.root / "results.md"
    results.write_text(eval_stage.format_table(metrics) + "\n")
    print(f"[demo] done: {results}")
    return metrics
