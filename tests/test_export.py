"""The export stage: the newest student checkpoint as an HF folder that transformers loads with the
same logits; refusal to replace a folder it did not write; the step and missing-checkpoint errors."""

import json

import numpy as np
import pytest
import torch
import transformers
from stage_helpers import run_stage
from test_distill_stage import build_run, make_config

from proxykd_jax import context
from proxykd_jax.errors import ProxyKDError
from proxykd_jax.stages import export
from proxykd_jax.train.export import default_config


def export_config(run_dir, **overrides):
    cfg = make_config(run_dir, **{"train.steps": 3, **overrides})
    cfg.export = default_config()
    return cfg


def load_student(cfg, source, step=0):
    with context.create(cfg, "export", lock=False) as ctx:
        return export.load(ctx, step, source)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = build_run(tmp_path_factory.mktemp("export"), n_samples=24)
    run_stage("distill", export_config(run_dir))
    return run_dir


def test_export_loads_in_transformers_with_matching_logits(trained):
    cfg = export_config(trained)
    out = run_stage("export", cfg)
    assert out == trained / "export" and (out / "tokenizer.json").exists()
    _, ours, step = load_student(cfg, trained / "student")
    assert step == 3
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(out), local_files_only=True, dtype=torch.float32
    ).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert len(tokenizer) <= cfg.model.vocab_size and tokenizer.decode(tokenizer.encode("w3 w7")) == "w3 w7"
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (2, 20)).astype(np.int32)
    with torch.no_grad():
        theirs = hf_model(torch.from_numpy(tokens).long()).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(tokens)), theirs, atol=1e-4, rtol=1e-4)
    # the newest checkpoint (step 3) was exported, not the older step-2 one
    _, older, _ = load_student(cfg, trained / "student", 2)
    assert not np.allclose(np.asarray(older(tokens)), theirs, atol=1e-4)


def test_export_refuses_a_non_empty_folder_and_bad_steps(trained, tmp_path):
    cfg = export_config(trained)
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    cfg.export.out = str(target)
    with pytest.raises(ProxyKDError, match="not made by `proxykd export`"):
        run_stage("export", cfg)
    cfg.run.overwrite = True
    run_stage("export", cfg)
    assert not (target / "keep.txt").exists() and (target / "model.safetensors").exists()
    cfg.export.step = 1
    with pytest.raises(ProxyKDError, match="export.step=1"):
        load_student(cfg, trained / "student", 1)
    with pytest.raises(ProxyKDError, match="no checkpoint"):
        load_student(cfg, trained / "nothing_here")


def test_export_in_size_limited_files_on_another_mesh_with_token_ids(trained, tmp_path):
    """A data=2 x fsdp=4 mesh and 3 kB files: the same tensors bit for bit as the one-file export,
    and config.json / generation_config.json carry the tokenizer's special ids."""
    from proxykd_jax.models.safetensors_io import SafetensorsFolder
    from proxykd_jax.models.tokenizer import load_tokenizer

    cfg = export_config(trained)
    one = run_stage("export", cfg)
    cfg.export.update(out=str(tmp_path / "split"), max_shard_bytes=3000)
    cfg.mesh.shape.update(data=2, fsdp=4, tensor=1)
    split = run_stage("export", cfg)
    index = json.loads((split / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not (split / "model.safetensors").exists()
    a, b = SafetensorsFolder(one), SafetensorsFolder(split)
    assert a.headers == b.headers
    for name in a.headers:
        np.testing.assert_array_equal(a.read(name, ()), b.read(name, ()), err_msg=name)
        assert index["weight_map"][name] == b.files[name].name
    sizes = [(split / f).stat().st_size for f in files]
    biggest = max(int(np.prod(shape)) * 4 for shape, _ in a.headers.values())
    assert all(s <= max(3000, biggest) + 2048 for s in sizes)  # header bytes on top of the data
    tok = load_tokenizer(one)
    for folder in (one, split):
        config = json.loads((folder / "config.json").read_text())
        generation = json.loads((folder / "generation_config.json").read_text())
        ids = (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
        assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == ids
        assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == ids
    cfg.export.max_shard_bytes = 0
    with pytest.raises(ProxyKDError, match="export.max_shard_bytes must be positive"):
        run_stage("export", cfg)


def test_export_with_another_model_config_names_the_mismatch_not_damage(trained):
    """A good checkpoint read with another model.d_ff: the message names the array and says to use the
    config it was trained with, and never advises deleting the checkpoint."""
    cfg = export_config(trained, **{"model.d_ff": 64})
    with pytest.raises(ProxyKDError, match="written with another model or optimizer config") as info:
        load_student(cfg, trained / "student")
    message = str(info.value)
    assert "checkpoint step 3" in message and "w_down/value is (1, 48, 32) but this config's is (1, 64, 32)" in message
    assert "delete" not in message and "overwrite" not in message


def test_a_step_of_a_run_without_checkpoints_is_refused_not_replaced_by_final(trained):
    """A student trained with train.checkpoint_every = 0 keeps only final/ (step 3): export.step=2 used to
    export final/ silently and record it as step 3; it is refused, and 0 or 3 still give final/."""
    cfg = export_config(trained, **{"train.checkpoint_every": 0, "distill.output": "student_no_checkpoints"})
    run_stage("distill", cfg)
    source = trained / "student_no_checkpoints"
    assert not (source / "checkpoints").exists() and (source / "final" / "config.json").exists()
    with pytest.raises(ProxyKDError, match=r"export.step=2 names a checkpoint, but .* keeps none, only the final"):
        load_student(cfg, source, 2)
    assert load_student(cfg, source, 0)[2] == load_student(cfg, source, 3)[2] == 3


def test_exported_tokenizer_config_has_no_load_time_keys_and_the_same_tokenizer(trained):
    """transformers 5 writes the arguments a tokenizer was loaded with (`local_files_only`, `is_local`)
    into the tokenizer_config.json it saves; the export leaves them out, and AutoTokenizer reads the
    same tokenizer back."""
    from proxykd_jax.models.tokenizer import load_tokenizer

    out = run_stage("export", export_config(trained))
    written = json.loads((out / "tokenizer_config.json").read_text())
    assert not {"local_files_only", "is_local", "name_or_path"} & written.keys()
    ours = load_tokenizer(trained / "prepared" / "tokenizer")
    theirs = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert theirs.get_vocab() == ours.get_vocab() and theirs.special_tokens_map == ours.special_tokens_map
    rng = np.random.default_rng()
    words = list(ours.get_vocab()) + ["unseen", "w3w7", "<eos>"]
    for _ in range(5):
        text = " ".join(rng.choice(words, size=int(rng.integers(1, 12))))
        assert theirs.encode(text) == ours.encode(text)
        ids = rng.integers(0, len(ours), size=8).tolist()
        assert theirs.decode(ids) == ours.decode(ids)


def test_an_instruct_students_end_of_turn_ids_survive_the_export(trained, tmp_path):
    """The folder the run's tokenizer came from lists an end-of-turn id besides the eos in its
    generation_config.json (Llama 3's <|eot_id|>): the export lists both, in config.json and
    generation_config.json, so transformers' `generate` and `proxykd serve` of the export stop at it
    (the export listed the tokenizer's eos alone: the student ran past its end of turn)."""
    import shutil

    from proxykd_jax.models.tokenizer import load_tokenizer
    from proxykd_jax.teacher.backends import LlamaBackend, load_backend

    tok_folder = tmp_path / "instruct"
    shutil.copytree(context.RunPaths.from_config(export_config(trained)).tokenizer, tok_folder)
    eos = load_tokenizer(tok_folder).eos_token_id
    turn = eos + 3
    (tok_folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, turn]}))
    cfg = export_config(trained)
    cfg.data.tokenizer = str(tok_folder)
    cfg.export.out = str(tmp_path / "export")
    out = run_stage("export", cfg)
    for name in ("config.json", "generation_config.json"):
        assert json.loads((out / name).read_text())["eos_token_id"] == [eos, turn], name
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == [eos, turn]
    from proxykd_jax.teacher.config import serve_config

    serve = serve_config()
    serve.update(source="hf", path=str(out))
    backend = load_backend(serve)
    assert isinstance(backend, LlamaBackend) and backend.stop_ids == (eos, turn)


def test_token_ids_list_the_eos_with_the_stop_ids():
    """eos_token_id: the eos alone, or the list of the eos and the end-of-turn ids; a single stop id of a
    tokenizer without an eos is kept (it was dropped)."""
    import types

    from proxykd_jax.models.hf import token_ids_of

    tok = types.SimpleNamespace(bos_token_id=1, eos_token_id=2, pad_token_id=None)
    assert token_ids_of(tok) == dict(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    assert token_ids_of(tok, (2, 5))["eos_token_id"] == [2, 5]
    assert token_ids_of(tok, (5, 2, 5))["eos_token_id"] == [2, 5]
    no_eos = types.SimpleNamespace(bos_token_id=None, eos_token_id=None, pad_token_id=0)
    assert token_ids_of(no_eos, (7,))["eos_token_id"] == 7 and token_ids_of(no_eos)["eos_token_id"] is None


def test_export_takes_the_start_folder_from_the_students_record(tmp_path, monkeypatch, caplog):
    """`proxykd distill $R --config.model.init_from=F` then `proxykd export $R`: the export keeps F's config.json
    keys (a Mistral's window) and stop ids, read from the record of the folder exported (export.source), not of
    distill's default student (the export was a Llama listing the eos alone); a later identical export is reused.
    A config's init_from that differs from the record's wins, with a warning naming both."""
    import dataclasses
    import logging

    from flax import nnx
    from test_distill_stage import SEQ, WORDS, _mistral_folder

    from proxykd_jax.context.artifacts import open_artifact
    from proxykd_jax.models import hf
    from proxykd_jax.models.llama import Llama, ModelConfig
    from proxykd_jax.models.tokenizer import build_word_tokenizer

    run = tmp_path / "run"
    eos = build_word_tokenizer(WORDS, run / "prepared" / "tokenizer").eos_token_id
    cfg = export_config(run)
    llama_folder = tmp_path / "llama"
    model_cfg = ModelConfig.from_config(cfg.model)
    hf.save_hf(Llama(model_cfg, rngs=nnx.Rngs(0)), model_cfg, llama_folder)
    mistral = _mistral_folder(cfg, tmp_path / "mistral", SEQ, 4 * SEQ)
    turn = eos + int(np.random.default_rng().integers(1, 20))
    (mistral / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, turn]}))
    paths = context.RunPaths.from_config(cfg)
    for output, folder in (("", llama_folder), ("student_b", mistral)):  # distill's records of two students
        cfg.model.init_from, cfg.distill.output = str(folder), output
        art = open_artifact("distill", cfg, paths, overwrite=False)
        art.begin()
        art.finish({"steps": 3})
    # student_b, distilled from the Mistral folder, has its window and context
    mistral_cfg = dataclasses.replace(model_cfg, sliding_window=SEQ, max_seq_len=4 * SEQ)
    loaded = [(mistral_cfg, Llama(mistral_cfg, rngs=nnx.Rngs(1)), 3)]
    monkeypatch.setattr(export, "load", lambda ctx, step=0, source=None: loaded[0])
    cfg.model.init_from, cfg.distill.output, cfg.export.source = "", "", "student_b"
    with caplog.at_level(logging.INFO, logger=export.__name__):
        out = run_stage("export", cfg)
    written = json.loads((out / "config.json").read_text())
    assert (written["model_type"], written.get("sliding_window"), written["max_position_embeddings"]) == (
        "mistral", SEQ, 4 * SEQ
    )  # fmt: skip
    assert written["eos_token_id"] == json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert written["eos_token_id"] == [eos, turn]
    assert f"model.init_from={mistral}" in caplog.text and "student_b" in caplog.text
    assert open_artifact("export", cfg, paths, overwrite=False).status == "done"  # the same command again: reused
    caplog.clear()
    loaded[0] = (model_cfg, Llama(model_cfg, rngs=nnx.Rngs(1)), 3)  # a student the Llama folder describes
    cfg.model.init_from, cfg.export.out = str(llama_folder), str(tmp_path / "other")
    with caplog.at_level(logging.INFO, logger=export.__name__):
        out = run_stage("export", cfg)
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and str(llama_folder) in warned[0] and str(mistral) in warned[0], warned
