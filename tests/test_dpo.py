"""The dpo objective: value and gradient against a hand computation, finite differences on a tiny
model, and a training run whose first step sits exactly at the reference (loss log 2 per pair)."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_objective import make_batch, np_softmax, tiny_cfg

from semloss_jax.data import readers, registry
from semloss_jax.data.batching import Example, rows_to_batch
from semloss_jax.data.reference import with_reference_logprobs
from semloss_jax.data.schema import Record
from semloss_jax.data.streams import DataSection, TrainRecords, build_streams, pair_chosen
from semloss_jax.errors import ConfigError, DataError, LossError
from semloss_jax.loss import cost
from semloss_jax.loss import objective as ob
from semloss_jax.models import llama as model_lib
from semloss_jax.train import config as C
from semloss_jax.train import loop as train_loop
from semloss_jax.train.state import model_config_of

SMOKE_PATH = Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml"

V = 64
DPO = ob.ObjectiveConfig(kind="dpo", lam=0.8, beta=0.5)


def pair_batches(rng, B=3, T=10):
    """A benign batch and a dpo harmful batch (rejected + chosen fields with ref_logp); row 2 of
    the chosen side has no loss token, so it is not a pair."""
    benign = make_batch(rng, 2, T, pad_tail=2)
    rej = make_batch(rng, B, T, pad_tail=1)
    cho = make_batch(rng, B, T, pad_tail=3)
    rej["loss_mask"][:, 0] = 1.0
    cho["loss_mask"][:2, 0] = 1.0
    cho["loss_mask"][2] = 0.0
    rej["ref_logp"] = -rng.uniform(0.5, 4.0, (B, T)).astype(np.float32)
    cho["ref_logp"] = -rng.uniform(0.5, 4.0, (B, T)).astype(np.float32)
    harmful = dict(rej, **{ob.CHOSEN + k: v for k, v in cho.items()})
    return benign, harmful, rej, cho


def np_dpo(rej_logits, rej, cho_logits, cho, beta):
    """float64 margins and per-pair losses straight from the definition."""
    def seq(logits, b):
        m = (b["loss_mask"] != 0) & (b["segment_ids"] != 0)
        p = np_softmax(logits)
        lp = np.log(np.take_along_axis(p, b["targets"][..., None], -1)[..., 0])
        return (lp * m).sum(-1), (b["ref_logp"] * m).sum(-1), m
    pw, rw, mw = seq(cho_logits, cho)
    pl, rl, ml = seq(rej_logits, rej)
    margin = beta * ((pw - rw) - (pl - rl))
    valid = mw.any(-1) & ml.any(-1)
    return margin, np.log1p(np.exp(-margin)), valid


def test_dpo_value_and_logit_gradient_match_the_hand_computation():
    rng = np.random.default_rng(0)
    benign, harmful, rej, cho = pair_batches(rng)
    T = rej["input_ids"].shape[1]
    zb, zr, zc = (rng.normal(0, 2, (n, T, V)).astype(np.float32) for n in (2, 3, 3))
    E_hat = cost.unit_embeddings(jnp.asarray(rng.normal(size=(V, 16)), jnp.float32))
    counts = ob.global_counts(benign, harmful)
    assert float(counts["pair_count"]) == 2.0

    def loss(zb, zr, zc):
        sums = ob.sums_from_logits(zb, benign, zr, harmful, E_hat, DPO, chosen_logits=zc)
        return ob.combine(sums, counts, DPO), sums

    (val, sums), (gb, gr, gc) = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(zb, zr, zc)
    margin, per_pair, valid = np_dpo(zr, rej, zc, cho, DPO.beta)
    assert valid.tolist() == [True, True, False]
    assert float(sums["dpo_sum"]) == pytest.approx(per_pair[valid].sum(), rel=1e-5)
    assert float(sums["dpo_acc_sum"]) == float((margin[valid] > 0).sum())
    mb = (benign["loss_mask"] != 0) & (benign["segment_ids"] != 0)
    ce = -np.log(np.take_along_axis(np_softmax(zb), benign["targets"][..., None], -1)[..., 0])[mb].mean()
    assert float(val) == pytest.approx(ce + DPO.lam * per_pair[valid].mean(), rel=1e-5)
    # d/dz_t of lam/P * softplus(-m): -lam/P * sigmoid(-m) * beta * (onehot(y_t) - p_t) on chosen
    # tokens, and the opposite sign on rejected tokens; zero elsewhere (and for the non-pair row)
    for z, b, g, sign in ((zc, cho, gc, -1.0), (zr, rej, gr, 1.0)):
        m = (b["loss_mask"] != 0) & (b["segment_ids"] != 0) & valid[:, None]
        coef = sign * DPO.lam / valid.sum() * DPO.beta / (1.0 + np.exp(margin))   # sigmoid(-m)
        onehot = np.eye(V)[b["targets"]]
        want = coef[:, None, None] * (onehot - np_softmax(z)) * m[..., None]
        np.testing.assert_allclose(np.asarray(g), want, atol=2e-6)


def test_dpo_param_gradient_matches_finite_differences():
    cfg = tiny_cfg()
    params = model_lib.init_params(cfg, jax.random.PRNGKey(3))
    params = dict(params, lm_head={"kernel": params["lm_head"]["kernel"] * 10.0})
    rng = np.random.default_rng(1)
    benign, harmful, _, _ = pair_batches(rng)
    E_hat = cost.unit_embeddings(model_lib.embedding_matrix(params))
    counts = ob.global_counts(benign, harmful)

    def f(p):
        sums = ob.loss_sums(p, cfg, benign, harmful, E_hat, DPO)
        return ob.combine(sums, counts, DPO)

    g = jax.grad(f)(params)
    d = jax.tree_util.tree_map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), params)
    eps = 1e-3
    shift = lambda s: jax.tree_util.tree_map(lambda a, b: a + s * b, params, d)  # noqa: E731
    fd = (float(f(shift(eps))) - float(f(shift(-eps)))) / (2 * eps)
    leaves = jax.tree_util.tree_leaves
    an = sum(float(jnp.vdot(a, b)) for a, b in zip(leaves(g), leaves(d)))
    assert an == pytest.approx(fd, rel=2e-2)


def test_reference_logprobs_sit_on_the_response_tokens():
    """With ref_logp from the same params, every margin is 0: the loss is log 2 per pair."""
    cfg = tiny_cfg()
    params = model_lib.init_params(cfg, jax.random.PRNGKey(4))
    rng = np.random.default_rng(2)

    def ex(i, n_p, n_r):
        ids = rng.integers(2, V, n_p + n_r).tolist()
        return Example(f"e{i}", tuple(ids[:n_p]), tuple(ids[n_p:]))

    rej = with_reference_logprobs(params, cfg, [ex(0, 5, 4), ex(1, 3, 7), ex(2, 6, 2)], pad_id=0,
                                  batch_size=2)
    cho = with_reference_logprobs(params, cfg, [ex(3, 5, 6), ex(4, 3, 3), ex(5, 6, 5)], pad_id=0)
    assert [len(e.response_ref) for e in rej] == [4, 7, 2]
    rb = rows_to_batch(rej, [[0], [1], [2]], batch_size=3, seq_len=12, pad_id=0)
    cb = rows_to_batch(cho, [[0], [1], [2]], batch_size=3, seq_len=12, pad_id=0)
    assert np.all((rb["ref_logp"] < 0) == (rb["loss_mask"] > 0))
    harmful = {k: v for k, v in rb.items() if k != "example_index"}
    harmful.update({ob.CHOSEN + k: v for k, v in cb.items() if k != "example_index"})
    benign = {k: v for k, v in rb.items() if k not in ("example_index", "ref_logp")}
    E_hat = cost.unit_embeddings(model_lib.embedding_matrix(params))
    sums = ob.loss_sums(params, cfg, benign, harmful, E_hat, DPO)
    assert float(sums["pair_count"]) == 3
    assert float(sums["dpo_sum"]) / 3 == pytest.approx(math.log(2.0), abs=1e-5)


def test_dpo_errors_name_what_is_missing(tmp_path):
    with pytest.raises(ConfigError, match="beta"):
        ob.ObjectiveConfig(kind="dpo", beta=0.0).validate()
    with pytest.raises(ConfigError, match="data.chosen"):
        C.load_config(SMOKE_PATH, ["objective.kind=dpo"])
    with pytest.raises(ConfigError, match="data.pack"):
        C.load_config(SMOKE_PATH, ["objective.kind=dpo", "data.chosen=x.jsonl", "data.pack=true"])
    rng = np.random.default_rng(0)
    benign, harmful, rej, _ = pair_batches(rng)
    with pytest.raises(LossError, match="chosen"):
        ob.sums_from_logits(jnp.zeros((2, 10, V)), benign, jnp.zeros((3, 10, V)), rej,
                            jnp.ones((V, 4)), DPO)
    h = registry.load_d_harmful("pyrit")[:3]
    path = tmp_path / "chosen.jsonl"
    readers.write_jsonl(path, [Record(id="c0", prompt=h[0].prompt, response="I can't help with that.",
                                      source="test", label="refusal")])
    assert pair_chosen(str(path), h[:1])[0].id == "c0"
    with pytest.raises(DataError, match="no safe reply"):
        pair_chosen(str(path), h[:2])
    with pytest.raises(ConfigError, match="key 'data.chosen': objective.kind=dpo needs data.chosen"):
        pair_chosen("", h[:1])


def test_dpo_keeps_the_untiled_head():
    """The dpo objective scores its pairs from the logits: never tiled automatically, an explicit tile is a
    ConfigError, and tiled statistics of a dpo batch are a LossError."""
    assert ob.ObjectiveConfig().head_tile(128256) > 0
    assert ob.ObjectiveConfig(kind="dpo").head_tile(128256) == 0
    with pytest.raises(ConfigError, match=r"objective\.vocab_tile.*dpo"):
        ob.ObjectiveConfig(kind="dpo", vocab_tile=4096).validate()
    rng = np.random.default_rng(5)
    benign, harmful, _, _ = pair_batches(rng)
    d = 8
    W = jnp.asarray(rng.normal(size=(d, V)), jnp.float32)
    E_hat = cost.unit_embeddings(jnp.asarray(rng.normal(size=(V, d)), jnp.float32))
    hb, hh = (jnp.asarray(rng.normal(size=(n, 10, d)), jnp.float32) for n in (2, 3))
    with pytest.raises(LossError, match="vocab_tile=0"):
        ob.sums_from_hidden(hb, benign, hh, harmful, W, E_hat, DPO, 16)


def test_dpo_pairs_in_one_shard_aligned_forward_equal_separate_ones():
    """Benign, rejected and chosen rows in one forward laid out for 2 row blocks give the sums of
    one block, and of three separate forwards (different sequence lengths)."""
    cfg = tiny_cfg()
    params = model_lib.init_params(cfg, jax.random.PRNGKey(6))
    rng = np.random.default_rng(7)
    benign, harmful, rej, cho = pair_batches(rng, B=4)
    benign = make_batch(rng, 2, 10, pad_tail=2)
    E_hat = cost.unit_embeddings(model_lib.embedding_matrix(params))
    one = ob.loss_sums(params, cfg, benign, harmful, E_hat, DPO, batch_shards=1)
    two = ob.loss_sums(params, cfg, benign, harmful, E_hat, DPO, batch_shards=2)
    zb, zr, zc = (model_lib.forward(params, cfg, jnp.asarray(b["input_ids"]), positions=b["positions"],
                                    segment_ids=b["segment_ids"]) for b in (benign, rej, cho))
    sep = ob.sums_from_logits(zb, benign, zr, harmful, E_hat, DPO, chosen_logits=zc)
    assert float(one["pair_count"]) == 3
    for k in ("ce_sum", "dpo_sum", "dpo_acc_sum", "pair_count", "div_sum"):
        assert float(two[k]) == pytest.approx(float(one[k]), rel=1e-5, abs=1e-6), k
        assert float(sep[k]) == pytest.approx(float(one[k]), rel=1e-5, abs=1e-6), k


class CharTok:
    """Character-level chat tokenizer."""

    pad_id = 0

    def prompt_ids(self, prompt, system=None):
        return [2] + [ord(c) % 60 + 4 for c in prompt] + [3]

    def response_ids(self, response):
        return [ord(c) % 60 + 4 for c in response] + [1]


def test_dpo_streams_pair_rows_and_split_over_processes():
    """Row i of the harmful and chosen batches is one pair (the reference's values travel with it);
    two 'processes' building rows 0..1 and 2..3 give exactly the single-process batches; a pair
    whose chosen side tokenization drops is left out."""
    harmful = [Record(id=f"h{i}", prompt=f"q{i}" + "p" * i, response="bad" * (i + 1), source="t")
               for i in range(7)]
    chosen = [Record(id=f"c{i}", prompt=h.prompt, response="no" * (i + 1), source="t")
              for i, h in enumerate(harmful)]
    chosen[3] = Record(id="c3", prompt=harmful[3].prompt, response=" ", source="t")  # dropped
    records = TrainRecords([Record(id="b0", prompt="hi", response="yo", source="t")], harmful, None, chosen)
    d = DataSection(seq_len=24, benign_batch=2, harmful_batch=4, max_prompt_len=24, pack=False)
    scored = []

    def reference(exs):   # stands in for the model: every token of the k-th example gets -k - 1
        scored.append([e.id for e in exs])
        return [dataclasses.replace(e, response_ref=np.full(len(e.response_ids), -1.0 - k, np.float32))
                for k, e in enumerate(exs)]

    obj = ob.ObjectiveConfig(kind="dpo")
    whole, stats = build_streams(d, obj, 0, CharTok(), records, reference=reference)
    assert scored[0] == [f"h{i}" for i in (0, 1, 2, 4, 5, 6)]
    assert scored[1] == [f"h{i}|chosen" for i in (0, 1, 2, 4, 5, 6)]
    assert "6 pairs" in stats["chosen"]
    parts = [build_streams(d, obj, 0, CharTok(), records, reference=reference,
                           rows={"benign": slice(i, i + 1), "harmful": slice(2 * i, 2 * i + 2)})[0]
             for i in range(2)]
    for _ in range(4):   # crosses epochs
        h, c = whole["harmful"].next_batch(), whole["chosen"].next_batch()
        pair_id = [np.unique(b["ref_logp"][r][b["loss_mask"][r] > 0]) for b in (h, c) for r in range(4)]
        assert all(len(u) == 1 for u in pair_id)
        assert [float(u[0]) for u in pair_id[:4]] == [float(u[0]) for u in pair_id[4:]]
        for name, want in (("harmful", h), ("chosen", c)):
            got = [p[name].next_batch() for p in parts]
            for k in want:
                np.testing.assert_array_equal(np.concatenate([g[k] for g in got]), want[k], err_msg=k)


@pytest.mark.slow
def test_dpo_training_run_starts_at_log2_and_moves_away(tmp_path):
    h = registry.load_d_harmful("pyrit")  # data.harmful_n of them are drawn
    path = tmp_path / "chosen.jsonl"
    safe = "I'm sorry, I can't help with that request."
    readers.write_jsonl(path, [Record(id=f"c{i}", prompt=r.prompt, response=safe, source="test",
                                      label="refusal") for i, r in enumerate(h)])
    cfg = C.load_config(SMOKE_PATH, ["objective.kind=dpo", "objective.lam=1.0", "objective.beta=1.0",
                                     f"data.chosen={path}", "run.steps=4", "run.progress=false",
                                     "run.tensorboard=false", "run.export_hf=false", "run.checkpoint_every=0",
                                     f"run.output_dir={tmp_path / 'run'}"])
    r = train_loop.train(cfg, echo=lambda s: None)
    m = r.metrics
    d = cfg.data   # the model's FLOPs count the chosen rows too: benign + rejected + chosen
    per_token = model_config_of(cfg.model).flops_per_token(d.seq_len)
    rows = (d.benign_batch + 2 * d.harmful_batch) * cfg.optim.grad_accum
    assert r.flops_per_step == pytest.approx(per_token * d.seq_len * rows)
    assert m[0]["dpo"] == pytest.approx(math.log(2.0), abs=1e-4)   # policy == reference
    assert m[-1]["dpo"] < m[0]["dpo"] - 0.05 and m[-1]["dpo_acc"] > 0.5
