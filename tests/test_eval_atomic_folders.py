"""The known teacher and proxy folders are saved atomically: a run killed mid-save (here: the save
raises after writing config.json and part of the weights) leaves only `<folder>.tmp`, which never
counts as done; the next run builds the folder again and it loads."""

from __future__ import annotations

import pathlib

import pytest
from pipeline_fixtures import tiny_config

from proxykd_jax.eval import benchmark, per_byte
from proxykd_jax.models import hf
from proxykd_jax.teacher.known import KnownTeacher


class Killed(Exception):
    pass


def _dies_mid_save(monkeypatch):
    """save_params writes config.json and a cut-off model.safetensors, then the process 'dies'."""
    real = hf.save_params

    def save(params, cfg, folder, tokenizer=None, **kw):
        real(params, cfg, folder, tokenizer, **kw)
        weights = pathlib.Path(folder) / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
        raise Killed

    monkeypatch.setattr(hf, "save_params", save)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    cfg = tiny_config(tmp_path_factory.mktemp("atomic") / "run")
    with cfg.unlocked():
        cfg.demo.teacher_d_model = 32
    return cfg


def test_a_teacher_and_proxy_killed_mid_save_are_built_again(tmp_path, monkeypatch, cfg):
    with monkeypatch.context() as m:
        _dies_mid_save(m)
        with pytest.raises(Killed):
            benchmark.make_teacher(cfg.demo, cfg.proxy, tmp_path / "teacher")
    assert not (tmp_path / "teacher").exists() and (tmp_path / "teacher.tmp" / "config.json").exists()
    teacher = benchmark.make_teacher(cfg.demo, cfg.proxy, tmp_path / "teacher")
    assert not (tmp_path / "teacher.tmp").exists()
    assert KnownTeacher.load(str(tmp_path / "teacher")).model_config == teacher.model_config

    with monkeypatch.context() as m:
        _dies_mid_save(m)
        with pytest.raises(Killed):
            benchmark.perturbed_proxy(teacher, tmp_path / "proxy_init", 0.1, 5)
    assert not (tmp_path / "proxy_init").exists()
    benchmark.perturbed_proxy(teacher, tmp_path / "proxy_init", 0.1, 5)
    assert hf.load_hf(str(tmp_path / "proxy_init"))[0] == teacher.model_config
    assert not (tmp_path / "proxy_init.tmp").exists()


def test_a_leftover_tmp_of_the_char_setup_never_counts_as_done(tmp_path, monkeypatch, cfg):
    cfg = cfg.copy_and_resolve_references()
    cfg.proxy.vocab_size, cfg.proxy.max_seq_len = 288, 128
    with monkeypatch.context() as m:
        _dies_mid_save(m)
        with pytest.raises(Killed):
            per_byte.char_teacher(5, tmp_path / "teacher", vocab_size=36, d_model=32, num_layers=1, proxy_cfg=cfg.proxy)
    assert not (tmp_path / "teacher").exists()
    teacher = per_byte.char_teacher(
        5, tmp_path / "teacher", vocab_size=36, d_model=32, num_layers=1, proxy_cfg=cfg.proxy
    )
    assert KnownTeacher.load(str(tmp_path / "teacher")).model_config == teacher.model_config
    (tmp_path / "bpe.tmp").mkdir()
    (tmp_path / "bpe.tmp" / "tokenizer.json").write_text('{"trunc')  # a half-written tokenizer
    tok = per_byte.bpe_from_teacher(teacher, tmp_path / "bpe", 288, texts=16)
    assert not (tmp_path / "bpe.tmp").exists() and len(tok) > 256
    with monkeypatch.context() as m:
        _dies_mid_save(m)
        with pytest.raises(Killed):
            per_byte.random_proxy(tok, cfg.proxy, tmp_path / "proxy_init", seed=1)
    assert not (tmp_path / "proxy_init").exists()
    per_byte.random_proxy(tok, cfg.proxy, tmp_path / "proxy_init", seed=1)
    assert hf.load_hf(str(tmp_path / "proxy_init"))[0].vocab_size == 288
