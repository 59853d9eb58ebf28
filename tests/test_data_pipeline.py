"""grain pipelines: packed-batch contract, packing vs unpacked log-probs, store join, exact resume."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_data_common import make_rows, make_tokenizer, tiny_cfg, write_jsonl

from proxykd_jax.data import DataError, PreparedData, StoreWriter, iter_samples, make_iterator, prepare, to_global_batch

K = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    tok = make_tokenizer(root / "tok")
    rows = make_rows(80, responses=2, logprobs=True, tokenizer=tok, words=(2, 10))
    cfg = tiny_cfg(
        **{"split.warmup": 0.0, "split.align": 0.0, "split.distill": 1.0, "split.heldout": 0.0, "seq_len": 48}
    )
    prepare([write_jsonl(root / "c.jsonl", rows)], tok, root / "prep", cfg, progress=False)
    pd = PreparedData(root / "prep")
    recs = {int(r["sample_id"]): r for r in pd.iter_split("distill")}
    rng = np.random.default_rng(0)
    store = {}
    with StoreWriter(
        root / "store",
        k=K,
        vocab_size=len(tok),
        tokenizer_hash=pd.tokenizer_hash,
        value_dtype="float32",
        tail_dtype="float32",
        shard_mb=0.01,
    ) as w:
        for sid, r in recs.items():
            t = len(r["tokens"]) - r["prompt_len"]
            ids = rng.integers(0, len(tok), size=(t, K))
            lps = np.sort(np.log(rng.dirichlet(np.ones(K + 1), size=t)[:, :K]), 1)[:, ::-1].copy()
            tail = 1 - np.exp(lps).sum(1)
            store[sid] = (ids, lps.astype(np.float32), tail.astype(np.float32), float(rng.uniform()))
            w.add(sid, *store[sid])
    return {"root": root, "tok": tok, "cfg": cfg, "pd": pd, "recs": recs, "store": store}


def _cfg(setup, **overrides):
    cfg = setup["cfg"].copy_and_resolve_references()
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def _segments(batch):
    for b in range(batch["tokens"].shape[0]):
        seg = batch["segment_ids"][b]
        for s in np.unique(seg[seg > 0]):
            yield b, np.flatnonzero(seg == s)


def test_packed_batches_follow_the_contract(setup):
    cfg = setup["cfg"]
    it = make_iterator(setup["pd"], "distill", cfg, store=setup["root"] / "store")
    seen = []
    for batch in it:
        assert {k: v.shape[:2] for k, v in batch.items()} == {k: (4, 48) for k in batch}
        assert batch["kd_ids"].shape == (4, 48, K) and batch["teacher_topk_logprobs"].shape == (4, 48, 20)
        assert batch["loss_mask"].dtype == np.float32
        pad = batch["segment_ids"] == 0
        assert np.all(batch["sample_ids"][pad] == -1) and np.all(batch["loss_mask"][pad] == 0)
        for b, idx in _segments(batch):
            assert np.all(np.diff(idx) == 1)  # contiguous
            sid = int(batch["sample_ids"][b, idx[0]])
            assert np.all(batch["sample_ids"][b, idx] == sid)
            seen.append(sid)
            r = setup["recs"][sid]
            np.testing.assert_array_equal(batch["positions"][b, idx], np.arange(len(idx)))
            np.testing.assert_array_equal(batch["tokens"][b, idx], r["tokens"][:-1])
            np.testing.assert_array_equal(batch["targets"][b, idx], r["tokens"][1:])
            np.testing.assert_array_equal(batch["loss_mask"][b, idx], r["loss_mask"][1:])
            np.testing.assert_array_equal(batch["teacher_topk_logprobs"][b, idx], r["teacher_topk_logprobs"][1:])
            ids, lps, tail, weight = setup["store"][sid]
            resp = idx[r["prompt_len"] - 1 :]  # inputs whose target is a response token
            np.testing.assert_array_equal(batch["kd_ids"][b, resp], ids)
            np.testing.assert_array_equal(batch["kd_logprobs"][b, resp], lps)
            np.testing.assert_array_equal(batch["kd_tail"][b, resp], tail)
            assert np.all(np.isneginf(batch["kd_logprobs"][b, idx[: r["prompt_len"] - 1]]))
            assert np.allclose(batch["weight"][b, idx], weight)
    assert len(seen) == len(set(seen)) and len(seen) >= 0.9 * len(setup["recs"])


@nnx.jit
def _logprobs_jit(model, tokens, positions, segments, targets):
    logp = jax.nn.log_softmax(model(tokens, positions, segments))
    return jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]


def _logprobs(model, tokens, positions, segments, targets):
    return np.asarray(_logprobs_jit(model, *map(jnp.asarray, (tokens, positions, segments, targets))))


def test_packing_does_not_leak_attention_across_samples(setup):
    from proxykd_jax.models.llama import Llama, ModelConfig

    cfg = ModelConfig(
        vocab_size=len(setup["tok"]),
        d_model=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        d_ff=64,
        max_seq_len=64,
    )
    model = Llama(cfg, rngs=nnx.Rngs(0))
    checked = 0
    for batch in _take(make_iterator(setup["pd"], "distill", setup["cfg"]), 3):
        checked += _check_packed(model, batch)
    assert checked >= 4


def _check_packed(model, batch) -> int:
    packed = _logprobs(model, batch["tokens"], batch["positions"], batch["segment_ids"], batch["targets"])
    checked = 0
    for b, idx in _segments(batch):
        if len(idx) == int((batch["segment_ids"][b] > 0).sum()):
            continue  # alone in its row already
        length = batch["tokens"].shape[1]
        row = {k: np.zeros((1, length), np.int32) for k in ("tokens", "positions", "segments", "targets")}
        row["tokens"][0, : len(idx)] = batch["tokens"][b, idx]
        row["targets"][0, : len(idx)] = batch["targets"][b, idx]
        row["positions"][0, : len(idx)] = np.arange(len(idx))
        row["segments"][0, : len(idx)] = 1  # the sample alone, at the start of its own row
        alone = _logprobs(model, row["tokens"], row["positions"], row["segments"], row["targets"])
        np.testing.assert_allclose(packed[b, idx], alone[0, : len(idx)], atol=2e-5, rtol=1e-5)
        checked += 1
    return checked


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize("workers", [0, 1])
def test_resume_sees_exactly_the_same_batches(setup, workers):
    cfg = _cfg(setup)
    cfg.num_epochs, cfg.num_workers = 0, workers  # repeat forever, reshuffled per epoch
    store = setup["root"] / "store"
    it = make_iterator(setup["pd"], "distill", cfg, store=store)
    _take(it, 3 if workers else 25)  # past the first epoch when in-process
    state = json.loads(json.dumps(it.get_state()))  # the state is plain JSON
    want = _take(it, 4)
    fresh = make_iterator(setup["pd"], "distill", cfg, store=store)
    fresh.set_state(state)
    _assert_same(_take(fresh, 4), want)


def test_iterator_state_in_an_orbax_composite_checkpoint(setup, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    cfg = setup["cfg"]
    it = make_iterator(setup["pd"], "distill", cfg)
    _take(it, 2)
    params = {"w": np.arange(6.0)}
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(
            2, args=ocp.args.Composite(state=ocp.args.StandardSave(params), data=grain.checkpoint.CheckpointSave(it))
        )
        mngr.wait_until_finished()
    want = _take(it, 3)
    fresh = make_iterator(setup["pd"], "distill", cfg)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        out = mngr.restore(
            2,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(params), data=grain.checkpoint.CheckpointRestore(fresh)
            ),
        )
    np.testing.assert_array_equal(out["state"]["w"], params["w"])
    _assert_same(_take(fresh, 3), want)


def test_store_problems_stop_before_training(setup, tmp_path):
    pd, cfg = setup["pd"], setup["cfg"]
    sids = sorted(setup["store"])
    with StoreWriter(tmp_path / "part", k=K, vocab_size=len(setup["tok"]), tokenizer_hash=pd.tokenizer_hash) as w:
        for sid in sids[:-3]:
            w.add(sid, *setup["store"][sid])
    with pytest.raises(DataError, match="store misses 3 of"):
        make_iterator(pd, "distill", cfg, store=tmp_path / "part")
    cfg_skip = _cfg(setup, on_error="skip")
    got = {
        int(s)
        for b in make_iterator(pd, "distill", cfg_skip, store=tmp_path / "part")
        for s in np.unique(b["sample_ids"])
        if s >= 0
    }
    assert got and not got & set(sids[-3:])
    with StoreWriter(tmp_path / "other", k=K, vocab_size=len(setup["tok"]), tokenizer_hash="x") as w:
        w.add(sids[0], *setup["store"][sids[0]])
    with pytest.raises(ValueError, match="tokenizer_hash"):
        make_iterator(pd, "distill", cfg, store=tmp_path / "other")
    # a model may pad its embedding past the store's ids (the tokenizer's), but not hold fewer rows
    make_iterator(pd, "distill", cfg, store=setup["root"] / "store", vocab_size=len(setup["tok"]) + 17)
    with pytest.raises(ValueError, match="more than the model's vocab_size"):
        make_iterator(pd, "distill", cfg, store=setup["root"] / "store", vocab_size=len(setup["tok"]) - 1)
    with StoreWriter(tmp_path / "short", k=K, vocab_size=len(setup["tok"]), tokenizer_hash=pd.tokenizer_hash) as w:
        for sid in sids:
            ids, lps, tail, weight = setup["store"][sid]
            w.add(sid, ids[:-1], lps[:-1], tail[:-1], weight)
    cfg_noshuffle = _cfg(setup, shuffle=False)
    with pytest.raises(DataError, match="store rows but .* response tokens"):
        next(make_iterator(pd, "distill", cfg_noshuffle, store=tmp_path / "short"))


def test_iter_samples_gives_one_padded_sample_per_row(setup):
    pd = setup["pd"]
    batches = list(iter_samples(pd, "distill", setup["cfg"], batch_size=7, store=setup["root"] / "store"))
    n = len(setup["recs"])
    assert len(batches) == -(-n // 7)
    seen = []
    for batch in batches:
        assert batch["tokens"].shape == (7, 48) and batch["kd_ids"].shape == (7, 48, K)
        for i in range(7):
            sid = int(batch["sample_ids"][i, 0])
            if batch["lengths"][i] == 0:
                assert sid == -1 and not batch["segment_ids"][i].any()
                continue
            r = setup["recs"][sid]
            m = len(r["tokens"]) - 1
            seen.append(sid)
            assert batch["lengths"][i] == m and batch["prompt_lengths"][i] == r["prompt_len"]
            np.testing.assert_array_equal(batch["tokens"][i, :m], r["tokens"][:-1])
            np.testing.assert_array_equal(batch["targets"][i, :m], r["tokens"][1:])
            assert np.all(batch["tokens"][i, m:] == setup["tok"].pad_token_id)
            assert np.all(batch["segment_ids"][i] == (np.arange(48) < m))
    assert sorted(seen) == sorted(setup["recs"])


def test_to_global_batch_on_the_mesh(setup):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2, 1), ("data", "fsdp", "tensor"))
    cfg = _cfg(setup, batch_size=8)
    batch = next(make_iterator(setup["pd"], "distill", cfg, store=setup["root"] / "store"))
    glob = to_global_batch(batch, mesh)
    assert "sample_ids" not in glob  # int64 ids stay on the host unless jax_enable_x64
    batch.pop("sample_ids")
    for k, v in batch.items():
        assert glob[k].shape == v.shape
        assert glob[k].sharding.spec[0] == ("data", "fsdp")
        np.testing.assert_array_equal(np.asarray(glob[k]), v)


def test_num_workers_change_neither_batches_nor_resume(setup, tmp_path):
    """data.num_workers is operational: the same batches, and a state saved under one count restores under another."""
    pd = setup["pd"]
    sids = sorted(setup["store"])
    with StoreWriter(tmp_path / "part", k=K, vocab_size=len(setup["tok"]), tokenizer_hash=pd.tokenizer_hash) as w:
        for sid in sids[:-3]:  # three samples skipped (data.on_error=skip): the state still counts them
            w.add(sid, *setup["store"][sid])
    cfg0, cfg2 = _cfg(setup, on_error="skip", num_workers=0), _cfg(setup, on_error="skip", num_workers=2)
    it = make_iterator(pd, "distill", cfg0, store=tmp_path / "part")
    want = _take(it, 6)
    two = make_iterator(pd, "distill", cfg2, store=tmp_path / "part")
    _assert_same(_take(two, 3), want[:3])
    state = json.loads(json.dumps(two.get_state()))
    del two
    fresh = make_iterator(pd, "distill", cfg0, store=tmp_path / "part")
    fresh.set_state(state)
    _assert_same(_take(fresh, 3), want[3:])


def test_rows_shorter_than_a_sample_stop_with_one_sentence(setup):
    longest = max(len(r["tokens"]) - 1 for r in setup["recs"].values())
    seq_len = longest - 1
    with pytest.raises(
        DataError, match=rf"distill: sample id \d+ has \d+ input tokens, more than the rows' seq_len {seq_len}"
    ):
        list(make_iterator(setup["pd"], "distill", setup["cfg"], seq_len=seq_len))
    with pytest.raises(DataError, match=rf"more than the rows' seq_len {seq_len} .*data.seq_len=48"):
        list(iter_samples(setup["pd"], "distill", setup["cfg"], batch_size=4, seq_len=seq_len))


def test_empty_prompt_joins_the_store_posterior_writes(tmp_path):
    """prompt_len 0: the first token is no target, so the store rows (as iter_samples' prompt_lengths place
    them for `posterior`) start at the second token, and make_iterator joins them there."""
    tok = make_tokenizer(tmp_path / "tok")
    rows = make_rows(6, responses=1) + [{"id": "empty", "prompt": "", "responses": ["the quick brown fox"]}]
    cfg = tiny_cfg(**{"split.warmup": 0.0, "split.align": 0.0, "split.distill": 1.0, "split.heldout": 0.0})
    prepare([write_jsonl(tmp_path / "c.jsonl", rows)], tok, tmp_path / "prep", cfg, progress=False)
    pd = PreparedData(tmp_path / "prep")
    assert [r["prompt_len"] for r in pd.iter_split("distill") if r["record_id"] == "empty"] == [0]
    with StoreWriter(tmp_path / "store", k=K, vocab_size=len(tok), tokenizer_hash=pd.tokenizer_hash) as w:
        for b in iter_samples(pd, "distill", cfg, batch_size=4):
            for i in np.flatnonzero(b["lengths"]):
                start, t = b["prompt_lengths"][i] - 1, b["lengths"][i] - b["prompt_lengths"][i] + 1
                y = b["targets"][i, start : start + t]  # each row's ids name the target it scores
                w.add(int(b["sample_ids"][i, 0]), np.repeat(y[:, None], K, 1), np.full((t, K), -3.0), np.zeros(t))
    seen = 0
    for b in make_iterator(pd, "distill", _noshuffle(cfg), store=tmp_path / "store"):
        m = b["loss_mask"] > 0
        np.testing.assert_array_equal(b["kd_ids"][..., 0][m], b["targets"][m])
        assert np.all(np.isneginf(b["kd_logprobs"][~m]))
        seen += len(np.unique(b["sample_ids"][b["sample_ids"] >= 0]))
    assert seen >= 4


def _noshuffle(cfg):
    cfg = cfg.copy_and_resolve_references()
    cfg.shuffle, cfg.batch_size = False, 2
    return cfg
