"""The library refusals behind the CLI's one-line errors about prepared data: an unknown, empty or
too small split, a manifest of another format or not JSON, and align's batch of rows (each a
`ProxyKDError`, a sentence that says what to do, never a KeyError or a bare ValueError)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from proxykd_jax import config as config_lib
from proxykd_jax.align import phases
from proxykd_jax.data.records import FORMAT_VERSION, PreparedData
from proxykd_jax.errors import ConfigError, InputFileError, ProxyKDError


def _manifest(root, **changes):
    root.mkdir(parents=True, exist_ok=True)
    split = {"samples": 0, "prompts": 0, "tokens": 0, "response_tokens": 0, "files": []}
    manifest = {
        "format_version": FORMAT_VERSION,
        "tokenizer": {"hash": "abc"},
        "split": {"fractions": {"warmup": 0.1, "align": 0.45, "distill": 0.4, "heldout": 0.05}},
        "splits": {
            "warmup": split | {"samples": 1, "prompts": 1},
            "align": dict(split),
            "distill": dict(split),
            "heldout": dict(split),
        },
    }
    (root / "manifest.json").write_text(json.dumps(manifest | changes))
    return root


def test_unknown_split_is_a_sentence_not_a_key_error(tmp_path):
    prepared = PreparedData(_manifest(tmp_path / "prepared"))
    for call in (prepared.num_samples, prepared.files):
        with pytest.raises(ProxyKDError, match=r"no split 'test' in the prepared data; choose one of warmup, align"):
            call("test")


def test_empty_and_small_splits_say_what_to_do(tmp_path):
    prepared = PreparedData(_manifest(tmp_path / "prepared"))
    with pytest.raises(
        ProxyKDError,
        match=r"split 'distill' has no samples \(it got data.split.distill=0.4 of the corpus's 1 prompts\); "
        r"give the corpus more prompts or raise data.split.distill, then re-run `proxykd prepare`",
    ):
        prepared.require_samples("distill")
    with pytest.raises(ProxyKDError, match=r"split 'warmup' has only 1 sample, fewer than 16 .*; lower it, or give"):
        prepared.require_samples("warmup", 16, short=", fewer than 16", fix="lower it, or ")
    assert prepared.require_samples("warmup") == 1


def test_manifest_of_another_format_or_not_json(tmp_path):
    root = _manifest(tmp_path / "prepared", format_version=99)
    with pytest.raises(InputFileError, match=r"manifest.json: format_version 99 is not 1, .*re-run `proxykd prepare`"):
        PreparedData(root)
    (root / "manifest.json").write_text('{"format_version": 1, "spl')
    with pytest.raises(InputFileError, match=r"manifest.json is not valid JSON"):
        PreparedData(root)


def test_align_rows_that_cannot_fill_a_batch():
    with pytest.raises(ProxyKDError, match=r"1 rows cannot fill one batch of align.batch_size=16; lower"):
        phases.row_batches({"tokens": np.zeros((1, 4), np.int32)}, 16, 0)


@pytest.mark.parametrize(
    "field, value, expect",
    [
        ("data.on_error", "ignore", "config.data.on_error='ignore' must be one of error, skip"),
        ("data.teacher_topk", -1, "config.data.teacher_topk=-1 must be at least 1"),
        ("data.teacher_topk", 0, "posterior.use_teacher_topk=False"),
        ("align.seq_len", -3, r"config.align.seq_len=-3 must be at least 0"),
        ("align.temperature", -0.5, r"config.align.temperature=-0.5 must be at least 0"),
        ("prior.exact_top_s", 0, "config.prior.exact_top_s=0 must be at least 1 .next tokens kept per prompt"),
        ("prior.ngram_top_s", -2, "config.prior.ngram_top_s=-2 must be at least 1 .continuations kept"),
        ("data.teacher_head", "byte", "config.data.teacher_head='byte' must be one of auto, exact, bytes"),
        ("eval.split", "test", "config.eval.split='test' must be one of warmup, align, distill, heldout"),
        ("distill.split", "train", "config.distill.split='train'"),
        ("distill.loss.tail_mode", "drop", "config.distill.loss.tail_mode='drop'"),
        ("distill.loss.jsd_beta", 1.0, r"config.distill.loss.jsd_beta=1.0 must lie in \[0, 1\)"),
        ("posterior.weight_normalize", "max", "config.posterior.weight_normalize='max'"),
        ("collect.api", "responses", "config.collect.api='responses'"),
        ("collect.top_logprobs", 21, "config.collect.top_logprobs=21 must be at most 20"),
        ("serve.port", 70000, "config.serve.port=70000 must be at most 65535"),
        ("serve.source", "gguf", "config.serve.source='gguf'"),
        ("align.prompts_per_round", 2, r"align.prompts_per_round=2 x samples_per_prompt=1 pairs cannot fill"),
    ],
)
def test_validate_refuses_enumerated_and_ranged_fields(field, value, expect):
    cfg = config_lib.base_config()
    group, *rest = field.split(".")
    node = cfg[group]
    for part in rest[:-1]:
        node = node[part]
    node[rest[-1]] = value
    with pytest.raises(ConfigError, match=expect):
        config_lib.validate(cfg)


def test_every_default_and_preset_passes_validate():
    import runpy

    from proxykd_jax.stages import STAGES

    root = config_lib.__file__.rsplit("/proxykd_jax/", 1)[0]
    for name, args in (("demo", ()), ("llama", ("7b,70b",)), ("report", ())):
        cfg = runpy.run_path(f"{root}/configs/{name}.py")["get_config"](*args)
        for stage in STAGES:
            config_lib.check_ranges(cfg, STAGES[stage].groups or tuple(cfg.keys()))
            config_lib._check_align(cfg.align)


@pytest.mark.parametrize(
    "stage, field, value",
    [("posterior", "posterior.batch_size", 12), ("eval", "eval.batch_size", 12), ("align", "align.eval_batch_size", 4)],
)
def test_every_sharded_batch_size_must_split_over_the_batch_shards(stage, field, value):
    """These batches are split over data x fsdp too: a size that does not divide used to pass
    validation and fail mid-stage, naming train.batch_size."""
    cfg = config_lib.base_config()
    group, name = field.split(".")
    cfg[group][name] = value
    with pytest.raises(ConfigError, match=rf"config.{field}={value} is not a multiple of .* 8 batch shards"):
        config_lib.validate(cfg, stage, num_devices=8)
    config_lib.validate(cfg, "prior", num_devices=8)  # a stage that does not use the field


@pytest.mark.parametrize(
    "shape, batch_axes, ways",
    [
        ({"data": 2, "fsdp": 2, "tensor": 2}, ("data", "fsdp", "tensor"), 8),
        ({"data": 2, "fsdp": 2, "tensor": 2}, ("data",), 2),
        ({"data": 1, "fsdp": 4, "tensor": 2}, ("tensor",), 2),
    ],
)
def test_batch_sizes_are_checked_against_the_rules_batch_entry(shape, batch_axes, ways):
    """The rows split over the mesh axes that `mesh.rules` maps `batch` to, not always data x fsdp: a table adding
    `tensor` used to pass validation and be refused only when the first batch was placed, after the model loaded;
    a table keeping rows off fsdp was refused a batch size it could run."""
    cfg = config_lib.base_config()
    cfg.mesh.shape = shape
    cfg.mesh.rules = tuple((k, batch_axes if k == "batch" else v) for k, v in cfg.mesh.rules)
    cfg.train.batch_size = ways  # splits
    config_lib.validate(cfg, "distill", num_devices=8)
    cfg.train.batch_size = ways + ways // 2  # does not (ways is even)
    described = " x ".join(batch_axes) + " = " + " x ".join(str(shape[a]) for a in batch_axes)
    with pytest.raises(ConfigError, match=re.escape(f"config.train.batch_size={ways + ways // 2} is not a multiple of "
                                                    f"the mesh's {described} batch shards; make it a multiple of {ways}.")):  # fmt: skip
        config_lib.validate(cfg, "distill", num_devices=8)
    cfg.mesh.rules = tuple((k, ("data", "pipeline") if k == "batch" else v) for k, v in cfg.mesh.rules)
    with pytest.raises(ConfigError, match=r"mesh.rules maps 'batch' to \['data', 'pipeline'\]; use mesh axes from"):
        config_lib.validate(cfg, "distill", num_devices=8)


@pytest.mark.parametrize("damage", ["missing", "truncated", "corrupted"])
def test_damaged_record_files_are_named_in_one_sentence(tmp_path, damage):
    """A record file deleted, cut short or overwritten in the middle: array_record raised a bare
    RuntimeError (empty for a cut file, naming no file for a corrupted one); now one sentence that
    names the file or its split and says to re-run prepare, from the training source and from
    iter_split alike."""
    from test_data_common import make_rows, make_tokenizer, tiny_cfg, write_jsonl

    from proxykd_jax.data import make_iterator, prepare

    tok = make_tokenizer(tmp_path / "tok")
    cfg = tiny_cfg(**{"split.warmup": 0.0, "split.align": 0.0, "split.distill": 1.0, "split.heldout": 0.0})
    prepare([write_jsonl(tmp_path / "c.jsonl", make_rows(30))], tok, tmp_path / "prep", cfg, progress=False)
    pd = PreparedData(tmp_path / "prep")
    f = pd.files("distill")[0]
    data = open(f, "rb").read()
    if damage == "missing":
        import os

        os.remove(f)
    else:
        cut = data[: len(data) // 2] if damage == "truncated" else data[:64] + bytes(len(data) - 128) + data[-64:]
        open(f, "wb").write(cut)
    where = f if damage == "missing" else str(tmp_path / "prep")
    with pytest.raises(InputFileError, match=rf"{where}.*re-run `proxykd prepare`"):
        list(pd.iter_split("distill"))
    with pytest.raises(InputFileError, match=rf"{where}.*re-run `proxykd prepare`"):
        list(make_iterator(pd, "distill", cfg))


def test_lora_alpha_of_zero_is_refused_only_with_adapters():
    """alpha / rank scales the adapters: alpha 0 trained adapters that changed nothing, silently."""
    cfg = config_lib.base_config()
    cfg.align.lora.alpha = 0.0
    config_lib.validate(cfg)  # rank 0: no adapters, alpha unused
    cfg.align.lora.rank = 4
    with pytest.raises(ConfigError, match=r"config.align.lora.alpha=0.0 must be a positive number"):
        config_lib.validate(cfg)
