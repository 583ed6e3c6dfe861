"""`python eval.py bounds` end to end on tiny random models (real tokenizer), and its summary math."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import eval as eval_cli
from semloss_jax.eval import bounds as bounds_report
from semloss_jax.loss.ot_exact import SinkhornConfig
from semloss_jax.models.llama import init_params, tiny_config
from semloss_jax.models.tokenizer import load_tokenizer
from semloss_jax.models.weights import export_hf
from semloss_jax.paths import default_model_path

SUMMARY_KEYS = {"positions", "pairs", "topk", "sinkhorn", "relative_gap", "spearman", "means", "gelbrich",
                "bound_violations", "ott_vs_lp", "onehot", "seconds_per_position", "compile_seconds",
                "model_forward_seconds_per_position", "load_seconds"}
METHODS = {"exact_ott", "exact_lp", "bounds_topk", "bounds_full", "onehot_ott", "onehot_closed_full",
           "gelbrich_r4_topk", "gelbrich_r32_topk", "gelbrich_adaptive_r4_topk", "gelbrich_full_r4",
           "gelbrich_full_r32"}


def _tiny_dir(root, seed):
    tok = load_tokenizer(default_model_path())
    cfg = tiny_config(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                      tie_word_embeddings=True, eos_token_id=tok.eos_id)
    return export_hf(init_params(cfg, jax.random.PRNGKey(seed)), cfg, root / f"tiny{seed}", tokenizer=tok)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, real_model_path):  # the real tokenizer (fails under CI if absent)
    root = tmp_path_factory.mktemp("bounds")
    return _tiny_dir(root, 0), _tiny_dir(root, 1)


@pytest.mark.slow  # ~30-50 s on a busy 2-core CPU (two tiny exports, compiles)
@pytest.mark.real_model  # reads the tokenizer out of the real GGUF
def test_bounds_subcommand_end_to_end(tiny_models, tmp_path, capsys):
    q_dir, p_dir = tiny_models
    out = tmp_path / "bounds"
    rc = eval_cli.main(["bounds", "--out", str(out), "--model", str(q_dir), "--model-p", str(p_dir),
                        "--positions", "10", "--topk", "4", "--max-response-tokens", "4",
                        "--lp-check", "3", "--gelbrich-ranks", "4,full", "--no-progress"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["positions"] == 10
    for name in ("bounds.json", "bounds.md", "bounds.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "bounds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rep = json.loads((out / "bounds.json").read_text())
    s = rep["summary"]
    assert SUMMARY_KEYS <= set(s)
    assert set(s["seconds_per_position"]) == METHODS
    assert all(v > 0 for v in s["seconds_per_position"].values())
    assert {"mean", "median"} <= set(s["relative_gap"]["lower"])
    assert {"mean", "median"} <= set(s["relative_gap"]["upper"])
    assert {"lower_vs_exact", "upper_vs_exact"} <= set(s["spearman"])
    assert s["pairs"] == 3 and len(rep["positions"]) == 10  # 4 + 4 + 2 positions
    ex, lo, up = (np.asarray(rep[k]) for k in ("exact", "lower", "upper"))
    for key in ("exact", "lower", "upper", "lower_full", "upper_full", "onehot_exact", "onehot_closed",
                "onehot_closed_full", "y"):
        assert len(rep[key]) == 10, key
    assert np.all(lo <= ex + 1e-4) and np.all(ex <= up + 1e-4)
    # the Gelbrich bound: LB <= LB_G(r=4) <= LB_G(full d = 32) <= exact at every position
    g4, g32 = np.asarray(rep["gelbrich_r4"]), np.asarray(rep["gelbrich_r32"])
    ga4 = np.asarray(rep["gelbrich_adaptive_r4"])
    assert np.all(lo <= g4 + 1e-4) and np.all(g4 <= g32 + 1e-4) and np.all(g32 <= ex + 1e-4)
    assert np.all(lo <= ga4 + 1e-4) and np.all(ga4 <= ex + 1e-4)  # any basis gives a bound
    assert set(s["gelbrich"]) == {"gelbrich_r4", "gelbrich_r32", "gelbrich_adaptive_r4"}
    assert s["gelbrich"]["gelbrich_r32"]["violations"] == 0
    assert s["gelbrich"]["gelbrich_r32"]["relative_gap"]["mean"] <= s["relative_gap"]["lower"]["mean"] + 1e-9
    assert s["bound_violations"]["lower_gt_exact"] == 0 and s["bound_violations"]["exact_gt_upper"] == 0
    # p and q come from different models: the distributions really differ
    assert ex.max() > 1e-4
    # one-hot targets: OTT reproduces the closed form on the same truncated p
    np.testing.assert_allclose(rep["onehot_exact"], rep["onehot_closed"], atol=1e-3)
    assert s["onehot"]["max_abs_ott_minus_closed"] <= 1e-3
    # OTT against the exact LP on the checked positions
    assert len(rep["lp"]) == 3
    np.testing.assert_allclose(ex[:3], rep["lp"], atol=1e-3)
    md = (out / "bounds.md").read_text()
    assert "seconds per position" in md and "Spearman" in md and "--model-p" in md and "LB_G" in md


def test_summary_math_on_known_arrays():
    """Relative gaps, Spearman and violation counts from hand-made per-position arrays."""
    n = 6
    ex = np.array([0.1, 0.2, 0.4, 0.8, 0.5, 0.0])  # the last one is below the gap floor
    a = {"exact": ex, "lower": ex * 0.5, "upper": ex * 3 + 0.1,
         "lower_full": ex * 0.4, "upper_full": ex * 2, "mass_p": np.ones(n), "mass_q": np.ones(n),
         "converged": np.array([True] * 5 + [False]), "n_iters": np.arange(n) * 10,
         "marginal_error": np.full(n, 1e-6), "lp": ex[:2] + 1e-5,
         "onehot_exact": np.full(n, 0.3), "onehot_closed": np.full(n, 0.3 + 2e-4),
         "onehot_closed_full": np.full(n, 0.31), "onehot_lower_full": np.full(n, 0.2),
         "onehot_converged": np.ones(n, bool)}
    s = bounds_report.summarize(a, {"seconds_per_position": {}}, k=4, cfg=SinkhornConfig(), n_pairs=2)
    assert s["relative_gap"]["positions_used"] == 5
    assert s["relative_gap"]["lower"]["mean"] == pytest.approx(0.5)
    gaps_up = (ex[:5] * 2 + 0.1) / ex[:5]
    assert s["relative_gap"]["upper"]["mean"] == pytest.approx(gaps_up.mean())
    assert s["relative_gap"]["upper"]["median"] == pytest.approx(np.median(gaps_up))
    assert s["spearman"]["lower_vs_exact"] == pytest.approx(1.0)
    assert s["sinkhorn"]["converged_fraction"] == pytest.approx(5 / 6)
    assert s["ott_vs_lp"]["max_abs_diff"] == pytest.approx(1e-5)
    assert s["onehot"]["max_abs_ott_minus_closed"] == pytest.approx(2e-4)
    assert s["bound_violations"] == {"lower_gt_exact": 0, "exact_gt_upper": 0, "tolerance": 1e-4}
    a["lower"] = ex + 0.01  # a broken "bound" is counted
    s = bounds_report.summarize(a, {"seconds_per_position": {}}, k=4, cfg=SinkhornConfig(), n_pairs=2)
    assert s["bound_violations"]["lower_gt_exact"] == 6
