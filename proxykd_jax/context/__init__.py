"""The run context: what every stage needs, built once by the CLI from the validated config.

    with context.create(cfg, "distill") as ctx:
        stages.run_stage("distill", ctx)

A `RunContext` holds the device mesh and the normalised sharding rules, the run paths, the
overwrite policy (`ctx.artifact()`, see `context/artifacts.py`), the run-directory lock
(`context/lock.py`), the sharded model loader (`ctx.load_model`, `ctx.init_model`) and the metric
sinks (`ctx.sink`, `ctx.write_json`). Stages are `run(ctx)` and combine library calls; nothing
below a stage reads the whole config.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
from collections.abc import Sequence

import jax
import ml_collections
from jax.sharding import Mesh

from proxykd_jax.context.artifacts import check_inputs, open_artifact, run_relative, settle
from proxykd_jax.context.lock import RunLock, RunLocked
from proxykd_jax.context.paths import STUDENT, RunPaths, student_name
from proxykd_jax.context.records import Artifact
from proxykd_jax.context.specs import ARTIFACTS, trial_stages
from proxykd_jax.errors import ConfigError, ProxyKDError

log = logging.getLogger(__name__)

__all__ = [
    "ARTIFACTS",
    "FOLDER_FIELDS",
    "Artifact",
    "RunContext",
    "RunLocked",
    "RunPaths",
    "create",
    "preflight",
    "run_config",
    "student_name",
]

_SHAPE_FIELDS = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "d_ff")
# What the model computes beyond its shapes: a stage that builds the model from its config group (distill's
# student) would silently run other RoPE or norms than the folder's weights were trained with.
# max_seq_len too: the student saved from its group would claim another context than its weights were trained for.
_NUMERICS_FIELDS = ("rope_theta", "rope_scaling", "rms_eps", "qkv_bias", "qk_norm", "tie_embeddings", "max_seq_len")
_NUMERICS_FIELDS += (  # Gemma 3's
    "norm_plus_one",
    "embed_scale",
    "activation",
    "sandwich_norms",
    "query_pre_attn_scalar",
    "layer_types",
    "rope_local_theta",
    "sliding_window",
    "rope_layers",  # SmolLM3's
    "partial_rotary_factor",  # Phi-3's
    "attn_softcap",  # Gemma 2's
    "logit_softcap",
)
FOLDER_FIELDS = _SHAPE_FIELDS + _NUMERICS_FIELDS  # what an init_from folder's config.json must agree on with its group


def run_config() -> ml_collections.ConfigDict:
    """Defaults of the `run` group."""
    cd = ml_collections.ConfigDict()
    cd.dir = "runs/default"  # run directory: every stage reads and writes here (context/paths.py)
    cd.seed = 0  # base seed; each stage derives its own streams from it
    cd.overwrite = False  # replace an artifact made with other settings (written beside, then moved into place)
    return cd


@dataclasses.dataclass
class RunContext:
    """Everything a stage needs; see the module docstring. Build it with `create`."""

    cfg: ml_collections.ConfigDict
    stage: str
    paths: RunPaths
    mesh: Mesh
    rules: tuple
    lock: RunLock | None = None

    @property
    def overwrite(self) -> bool:
        return bool(self.cfg.run.overwrite)

    @property
    def seed(self) -> int:
        return int(self.cfg.run.seed)

    @property
    def is_writer(self) -> bool:
        """Whether this process writes shared files (process 0)."""
        return jax.process_index() == 0

    # ------------------------------------------------------------------ the overwrite rule

    def artifact(self, name: str | None = None) -> Artifact:
        """What to do with stage `name`'s artifact (default: this stage's); raises on a refusal."""
        from proxykd_jax.parallel import hosts

        return open_artifact(
            name or self.stage,
            self.cfg,
            self.paths,
            overwrite=self.overwrite,
            sync=hosts.sync,
            writer=self.is_writer,
            share=hosts.broadcast_text,
        )

    def artifact_path(self, name: str) -> pathlib.Path:
        """Where stage `name`'s artifact is for this config (no decision, no check)."""
        return ARTIFACTS[name].path(self.cfg, self.paths)

    # ------------------------------------------------------------------ models on the mesh

    def model_config(self, group):
        """The ModelConfig of a model config group (`model`, `proxy`)."""
        from proxykd_jax.models.llama import ModelConfig

        try:
            return ModelConfig.from_config(group)
        except (TypeError, ValueError) as e:
            raise ProxyKDError(f"model config: {e}; see models/config.py default_config() for the fields.") from None

    def load_model(self, folder, *, dtype: str = "float32", param_dtype: str = "float32", group=None, rows=None):
        """(ModelConfig, Llama) from a Hugging Face folder, every parameter streamed straight into its
        sharded array on the mesh (each process reads only the blocks its devices hold). `group` (a model
        config group) says how it runs: remat, layer scan, attention path (config.json does not); `rows`
        (seq_len, the field that sets it): refused before any weight is read where longer than the model's
        max_seq_len."""
        from proxykd_jax.models.hf import RUN_FIELDS

        folder = pathlib.Path(folder).expanduser()
        if not (folder / "config.json").exists():
            raise ProxyKDError(f"{folder} is not a Hugging Face model folder (no config.json).")
        if rows is not None:
            folder_cfg = load_folder(folder, config_only=True, dtype=dtype, param_dtype=param_dtype)
            self.require_fits(folder_cfg, *rows, f"the model in {folder}")
        run = None if group is None else {f: getattr(self.model_config(group), f) for f in RUN_FIELDS}
        return load_folder(folder, dtype=dtype, param_dtype=param_dtype, mesh=self.mesh, rules=self.rules, run=run)

    @staticmethod
    def require_fits(model_cfg, seq_len: int, field: str, model: str) -> None:
        """Refuses rows of `seq_len` positions (`field`) longer than `model`'s max_seq_len: the model was
        never trained at the positions past it, and RoPE would run there without a word."""
        if int(seq_len) > int(model_cfg.max_seq_len):
            raise ConfigError(
                f"config.{field}={seq_len} exceeds the max_seq_len {model_cfg.max_seq_len} of {model}; lower "
                f"{field} to at most {model_cfg.max_seq_len} (positions past it are ones the model never saw)."
            )

    def init_model(self, name: str, seed: int, *, rows=None):
        """(ModelConfig, sharded Llama) of config group `name`: its `init_from` folder (whose shapes and
        numerics must agree with the group; it runs as the group says: remat, scan, attention), else a
        random init from `seed`, built directly into sharded memory. `rows` as in `load_model`."""
        from flax import nnx

        from proxykd_jax.models.llama import Llama
        from proxykd_jax.parallel import sharding

        group = self.cfg[name]
        model_cfg = self.model_config(group)
        if not group.init_from:
            if rows is not None:
                self.require_fits(model_cfg, *rows, f"the {name}")
            return model_cfg, sharding.create_sharded_model(
                Llama, self.mesh, self.rules, model_cfg, rngs=nnx.Rngs(params=seed)
            )
        folder, folder_cfg = init_folder(name, group, model_cfg)  # before any weight is read
        if rows is not None:
            self.require_fits(folder_cfg, *rows, f"the {name} in {folder}")
        return self.load_model(folder, dtype=model_cfg.dtype, param_dtype=model_cfg.param_dtype, group=group)

    # ------------------------------------------------------------------ metric sinks

    def sink(self, folder, *, tensorboard: bool = False):
        """A metrics writer for `folder` (JSONL, optionally TensorBoard; process 0 writes)."""
        from proxykd_jax.train.metrics import MetricsWriter

        return MetricsWriter(folder, tensorboard)

    def write_json(self, path, obj) -> None:
        """Writes `obj` as JSON atomically (process 0)."""
        if not self.is_writer:
            return
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(obj, indent=1, default=repr))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        tmp.replace(path)

    # ------------------------------------------------------------------ derived contexts

    def with_config(self, cfg: ml_collections.ConfigDict, stage: str | None = None) -> RunContext:
        """The same mesh, lock and run directory with another config (e.g. the alpha = 0 student)."""
        return dataclasses.replace(self, cfg=cfg, stage=stage or self.stage)

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def __enter__(self) -> RunContext:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def init_folder(name: str, group, model_cfg):
    """(folder, its ModelConfig) of config group `name`'s `init_from` (the group's ModelConfig: `model_cfg`),
    refused in one sentence where it has no config.json or its shapes and numerics disagree with the group."""
    folder = pathlib.Path(group.init_from).expanduser()
    if not (folder / "config.json").exists():
        raise ProxyKDError(
            f"config.{name}.init_from={str(folder)!r} has no config.json; point it at a local Hugging Face "
            "model folder, or set it to '' for a random init."
        )
    folder_cfg = load_folder(folder, config_only=True, dtype=model_cfg.dtype, param_dtype=model_cfg.param_dtype)
    diff = [
        f"{f}={getattr(folder_cfg, f)} (config: {getattr(model_cfg, f)})"
        for f in FOLDER_FIELDS
        if getattr(folder_cfg, f) != getattr(model_cfg, f)
    ]
    if diff:
        raise ProxyKDError(
            f"{folder}/config.json disagrees with config.{name} on {', '.join(diff)}; make the {name} "
            "group match the folder (or pick the matching preset)."
        )
    return folder, folder_cfg


def load_folder(folder: pathlib.Path, *, config_only: bool = False, **kwargs):
    """`models.hf.load_hf` (`config_only`: `read_config`, reading no weight) with its refusals
    (architecture, shapes, unreadable weights) as one sentence."""
    from safetensors import SafetensorError

    from proxykd_jax.errors import ModelFolderError
    from proxykd_jax.models import hf

    try:
        if config_only:
            return hf.read_config(folder, **kwargs)
        return hf.load_hf(folder, **kwargs)
    except (ValueError, KeyError, SafetensorError, OSError) as e:
        if isinstance(e, ProxyKDError):
            raise
        detail = e if isinstance(e, ValueError) else f"unreadable weights: {type(e).__name__}: {e}"
        raise ModelFolderError(
            f"{folder} cannot be loaded: {str(detail).rstrip('.')}; a model folder holds a Llama, Mistral, Qwen2 or Qwen3 "
            "config.json and its weights as safetensors (model.safetensors, or shards and their index): restore "
            "what is missing or damaged, or re-save the model with transformers' save_pretrained."
        ) from None


def _take_lock(paths: RunPaths, stage: str, artifact: str = "") -> RunLock:
    """Process 0 takes the lock (naming `artifact`, the path the stage writes: `proxykd status`); every process
    learns whether it did and stops together if not."""
    from proxykd_jax.parallel import hosts

    lock, error = RunLock(paths.lock, stage, artifact), None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except Exception as e:  # held by another run, or a full disk: the other processes must not wait on
            error = e
    if hosts.broadcast(0 if error is None else 1):
        raise error or RunLocked(
            f"process 0 could not take {paths.lock} (another run holds it, or it could not be written); "
            "process 0's error says which."
        )
    return lock


def _aligned_proxy(cfg, paths: RunPaths) -> tuple[pathlib.Path, str, str]:
    """The posterior's proxy as `_needs` names it: `posterior.proxy`, else the run's aligned one."""
    proxy = pathlib.Path(cfg.posterior.proxy or paths.proxy / "final").expanduser()
    return proxy / "config.json", "the aligned proxy", "align"


def _needs(cfg, stage: str, paths: RunPaths) -> list[tuple[pathlib.Path, str, str]]:
    """(path that must exist, what it is, the stage that makes it) for `stage`'s upstream inputs."""
    prepared = (paths.prepared / "manifest.json", "the prepared data", "prepare")
    if stage == "prepare" and not str(cfg.data.corpus):
        corpus = ARTIFACTS["collect"].path(cfg, paths)
        return [(corpus, "the collected corpus (data.corpus is empty)", "collect")]
    if stage in ("prior", "align", "eval"):
        return [prepared]
    if stage == "choose":  # what the trials of its field read from the run
        run = trial_stages(str(cfg.choose.field))
        out = [prepared]
        if "posterior" in run and "prior" not in run:
            out.append((paths.prior, "the prior tables", "prior"))
        if "posterior" in run and "align" not in run:
            out.append(_aligned_proxy(cfg, paths))
        if "posterior" not in run:
            out.append((paths.posterior, "the posterior store", "posterior"))
        return out
    if stage == "posterior":
        return [prepared, (paths.prior, "the prior tables", "prior"), _aligned_proxy(cfg, paths)]
    if stage == "distill":
        needs = [prepared]
        if not cfg.distill.white_box and float(cfg.distill.loss.alpha) > 0:
            needs.append((paths.posterior, "the posterior store", "posterior"))
        return needs
    if stage == "export":
        source = paths.student(cfg.export.source or student_name(cfg.distill))
        what = "the student" if source.name == STUDENT else f"the distilled model {source.name!r}"
        return [(paths.tokenizer, "the run's tokenizer", "prepare"), (source, what, "distill")]
    return []


# The stages that train a model folder on the run's token ids, and the groups whose `init_from` each reads.
_TOKENIZER_GROUPS = {"prepare": ("model", "proxy"), "align": ("proxy",), "distill": ("model",)}


def _check_shared_tokenizer(cfg, stage: str, paths: RunPaths) -> None:
    """Refuses an `init_from` folder holding another tokenizer than the run's (`data.tokenizer` at prepare, the
    prepared copy after): its embedding rows index its own tokens, and the run would train and score it on the
    run's ids (the student and the proxy share one tokenizer). A folder without a tokenizer is taken as it is."""
    from proxykd_jax.models.tokenizer import has_tokenizer, load_tokenizer, vocabulary_difference

    def tokenizer_of(folder: pathlib.Path):
        try:  # one that cannot be loaded is left to the stage (the run's) or was never read (a model folder's)
            return load_tokenizer(folder) if has_tokenizer(folder) else None
        except (OSError, ValueError, TypeError):
            return None

    if stage == "prepare":
        ours, what = pathlib.Path(str(cfg.data.tokenizer)).expanduser(), f"data.tokenizer={cfg.data.tokenizer}"
    else:
        ours, what = paths.tokenizer, f"the run's ({paths.tokenizer}, prepare's copy of data.tokenizer)"
    groups = [name for name in _TOKENIZER_GROUPS.get(stage, ()) if str(cfg[name].init_from)]
    folders = {name: pathlib.Path(str(cfg[name].init_from)).expanduser() for name in groups}
    folders = {name: folder for name, folder in folders.items() if folder != ours and has_tokenizer(folder)}
    if not folders or (stage == "prepare" and not str(cfg.data.tokenizer)):
        return
    run_tokenizer = tokenizer_of(ours)
    if run_tokenizer is None:
        return
    for name, folder in folders.items():
        theirs = tokenizer_of(folder)
        difference = "" if theirs is None else vocabulary_difference(run_tokenizer, theirs)
        if difference:
            raise ConfigError(
                f"config.{name}.init_from={folder} holds another tokenizer than {what}: {difference}; the student "
                "and the proxy must share one tokenizer, since each model's embedding rows index its own tokens: "
                "pick a student and a proxy of one tokenizer."
            )


def check_run_dir(paths: RunPaths) -> None:
    """Refuses a run directory that is a file or lies under one (nothing could be made there); reads only."""
    for where in (paths.root, *paths.root.parents):
        try:
            if not where.exists():
                continue
            is_dir = where.is_dir()
        except OSError:  # not readable: the stage's own error names it
            return
        if not is_dir:
            raise ProxyKDError(
                f"config.run.dir is {paths.root}, but {where} is a file, not a folder; set --config.run.dir to a "
                "folder (it is created if missing)."
            )
        return


def preflight(cfg, stage: str) -> None:
    """Refuses, before the run directory is created or locked, a stage whose upstream artifacts are not
    finished, whose upstream inputs are missing, or that would train a model folder holding another tokenizer
    than the run's (unless its own artifact is already finished and would be reused). Reads files only."""
    if stage not in ARTIFACTS:
        return
    paths = RunPaths.from_config(cfg)
    check_run_dir(paths)
    spec = ARTIFACTS[stage]
    check_inputs(stage, cfg, paths, writer=False)
    record = settle(spec.path(cfg, paths), spec.is_file, writer=False)
    if record is not None and record.get("finished"):
        return
    for path, what, maker in _needs(cfg, stage, paths):
        if not path.exists():
            raise ProxyKDError(f"{path} does not exist: {what} is missing; run `proxykd {maker}` first.")
    _check_shared_tokenizer(cfg, stage, paths)


def create(
    cfg,
    stage: str,
    *,
    devices: Sequence[jax.Device] | None = None,
    lock: bool | None = None,
    on_mesh: bool = True,
) -> RunContext:
    """The context of `stage` for a validated config: mesh over `devices` (default: all), normalised
    rules, paths and, for stages that write an artifact (all but `serve`), the run-directory lock.

    `on_mesh=False` is for stages that place no model (collect, prepare, prior): their mesh is one local
    device, so they run on any host (a login node, a laptop) whatever mesh the config names."""
    from proxykd_jax import parallel

    try:
        if on_mesh:
            mesh = parallel.make_mesh(cfg.mesh, devices)
        else:
            one = ml_collections.ConfigDict({"shape": {"data": 1, "fsdp": 1, "tensor": 1}})
            mesh = parallel.make_mesh(one, list(devices or jax.local_devices())[:1])
        rules = parallel.normalize_rules(cfg.mesh.rules)
    except ValueError as e:
        raise ProxyKDError(str(e)) from None
    paths = RunPaths.from_config(cfg)
    take = (stage in ARTIFACTS) if lock is None else lock
    # the lock names the artifact its stage writes, relative to the run directory
    artifact = run_relative(ARTIFACTS[stage].path(cfg, paths), paths) if stage in ARTIFACTS else ""
    return RunContext(
        cfg=cfg,
        stage=stage,
        paths=paths,
        mesh=mesh,
        rules=rules,
        lock=_take_lock(paths, stage, artifact) if take else None,
    )
