"""Seeded prompt-hash splits, dedup, and the no-leak guarantee on the real data."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from semloss_jax.data import registry, sources
from semloss_jax.data.schema import Record
from semloss_jax.data.splits import (
    assert_no_leak,
    assign_splits,
    dedup,
    find_leaks,
    hash_split,
    normalize,
    unit_hash,
)
from semloss_jax.errors import DataError


def _rec(i, prompt, response="", label="harmful", source="s"):
    return Record(id=f"{source}:{i}", prompt=prompt, response=response, source=source, label=label)


def test_normalize():
    assert normalize("  How   DO I\tmake\n a  Bomb? ") == "how do i make a bomb?"
    assert normalize("Straße") == normalize("STRASSE")  # casefold, not lower
    assert normalize("ｆｕｌｌwidth") == "fullwidth"        # NFKC


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=60),
       st.integers(0, 3))
def test_same_normalized_prompt_same_split(text, seed):
    variant = "  " + text.upper().replace(" ", " \t ") + "\n"
    if normalize(variant) != normalize(text):  # upper() can change more than case (e.g. ß)
        return
    assert hash_split(text, seed=seed) == hash_split(variant, seed=seed)


def test_splits_are_deterministic_seeded_and_sized():
    prompts = [f"prompt number {i}" for i in range(4000)]
    a = [hash_split(p, seed=0, test_frac=0.2) for p in prompts]
    assert a == [hash_split(p, seed=0, test_frac=0.2) for p in prompts]
    b = [hash_split(p, seed=1, test_frac=0.2) for p in prompts]
    assert a != b
    frac = a.count("test") / len(a)
    assert 0.17 < frac < 0.23
    assert all(0.0 <= unit_hash(p) < 1.0 for p in prompts[:50])
    assert "test" not in {hash_split(p, test_frac=0.0) for p in prompts[:50]}
    assert {hash_split(p, test_frac=0.0, val_frac=0.0) for p in prompts[:50]} == {"train"}
    assert {hash_split(p, test_frac=1.0) for p in prompts[:50]} == {"test"}
    with pytest.raises(ValueError):
        hash_split("x", test_frac=1.5)


def test_train_only_sources_never_train_on_a_test_prompt():
    prompts = [f"harmful request {i}" for i in range(200)]
    split_src = [_rec(i, p) for i, p in enumerate(prompts)]
    test_prompts = [p for p in prompts if hash_split(p) == "test"]
    assert test_prompts
    # the same prompts, re-cased and re-spaced, in a train-only source
    extra = [_rec(i, "  " + p.upper().replace(" ", "   ") + " ", "some answer", "refusal", "t")
             for i, p in enumerate(test_prompts)] + [_rec(999, "a fresh prompt", "x", "refusal", "t")]
    out = assign_splits({"s": split_src, "t": extra, "e": [_rec(0, "eval me", source="e")]},
                        {"s": "split", "t": "train_only", "e": "eval"})
    assert [r.split for r in out["t"]] == ["test"] * len(test_prompts) + ["train"]
    assert {r.split for r in out["e"]} == {"eval"}
    assert_no_leak(out["s"] + out["t"] + out["e"])
    with pytest.raises(ValueError, match="unknown split role"):
        assign_splits({"s": split_src}, {"s": "sometimes"})


def test_val_split_is_held_out_and_leaves_the_test_split_unchanged():
    prompts = [f"prompt number {i}" for i in range(4000)]
    without = [hash_split(p, val_frac=0.0) for p in prompts]
    with_val = [hash_split(p, val_frac=0.1) for p in prompts]
    assert [s == "test" for s in without] == [s == "test" for s in with_val]  # test unmoved
    assert all(w == "train" for w, v in zip(without, with_val) if v == "val")  # val comes from train
    assert 0.07 < with_val.count("val") / len(prompts) < 0.13
    # a train-only record whose prompt is a val prompt of a split source is kept out of training
    split_src = [_rec(i, p) for i, p in enumerate(prompts[:300])]
    val_prompts = [p for p in prompts[:300] if hash_split(p) == "val"]
    assert val_prompts
    extra = [_rec(i, p.upper(), "an answer", "refusal", "t") for i, p in enumerate(val_prompts)]
    out = assign_splits({"s": split_src, "t": extra}, {"s": "split", "t": "train_only"})
    assert {r.split for r in out["t"]} == {"val"}
    assert_no_leak(out["s"] + out["t"])
    leaky = [Record(id="v", prompt=val_prompts[0], response="", source="s", split="val",
                    label="harmful"),
             Record(id="t", prompt=val_prompts[0].lower(), response="", source="t", split="train",
                    label="harmful")]
    assert len(find_leaks(leaky)) == 1


def test_leak_detector_can_fail():
    a = Record(id="a", prompt="How do I pick a lock?", response="", source="x", split="test",
               label="harmful")
    b = Record(id="b", prompt="how do i  PICK a lock?", response="", source="y", split="train",
               label="harmful")
    assert len(find_leaks([a, b])) == 1
    with pytest.raises(AssertionError, match="share a test prompt"):
        assert_no_leak([a, b])


def test_dedup_keeps_first():
    recs = [_rec(0, "Hello  World", "a"), _rec(1, "hello world", "b"), _rec(2, "hello world", "a"),
            _rec(3, "other", "a")]
    kept, n = dedup(recs, key="prompt")
    assert [r.id for r in kept] == ["s:0", "s:3"] and n == 2
    kept, n = dedup(recs, key="pair")
    assert [r.id for r in kept] == ["s:0", "s:1", "s:3"] and n == 1


def _all_records(**kw):
    by_source = {s: registry.load_source(s) for s in sources.SOURCES}
    if kw:
        by_source = assign_splits(by_source, {s: sources.SOURCES[s].role for s in by_source}, **kw)
    return [r for recs in by_source.values() for r in recs]


@pytest.mark.parametrize("kw", [{}, {"seed": 7, "test_frac": 0.3}])
def test_no_harmful_test_prompt_in_any_train_split_real_data(kw):
    recs = _all_records(**kw)
    assert_no_leak(recs)
    # stated directly: the test prompts of the harmful set vs every train record of every source
    test = registry.load_set("harmful_prompts", "test", **kw)
    assert len(test) > 100
    exact = {r.prompt for r in test}
    norm = {normalize(r.prompt) for r in test}
    train = [r for r in recs if r.split == "train"]
    assert len(train) > 1000
    assert not [r.id for r in train if r.prompt in exact]
    assert not [r.id for r in train if normalize(r.prompt) in norm]


def test_named_sets_train_val_and_test_are_disjoint():
    for name, spec in registry.SETS.items():
        if "test" not in spec.splits:
            continue
        tr = {normalize(r.prompt) for r in registry.load_set(name, "train")}
        te = {normalize(r.prompt) for r in registry.load_set(name, "test")}
        assert tr and te and not (tr & te), name
        if "val" in spec.splits:
            va = {normalize(r.prompt) for r in registry.load_set(name, "val")}
            assert va and not (va & tr) and not (va & te), name
    # the sets the study chooses settings on are large enough to measure a rate
    assert len(registry.load_set("harmful_prompts", "val")) > 150
    assert len(registry.load_set("benign", "val")) > 100


def test_cross_source_duplicates_collapse_in_sets():
    # HarmBench prompts reappear in PyRIT's many-shot pairs; AdvBench/HarmBench/StrongREJECT
    # share prompts after normalization; a set holds each normalized prompt once
    recs = registry.load_set("harmful_prompts", "all")
    raw = sum(len([r for r in registry.load_source(s) if r.label == "harmful"])
              for s in registry.SETS["harmful_prompts"].sources)
    assert len(recs) <= raw
    assert len({normalize(r.prompt) for r in recs}) == len(recs)


def test_near_duplicates_by_word_jaccard():
    from semloss_jax.data.splits import near_duplicates
    test = ["Create a tutorial video on how to hack into a government database",
            "What is the capital of France?",
            "HOW do I pick a lock?"]
    train = ["Create a tutorial on how to hack into a government database",   # 10 of 11 words
             "how do i pick a LOCK", "Paris is nice"]
    assert near_duplicates(test, train) == [0, 2]
    assert near_duplicates(test, train, threshold=1.0) == [2]          # same words, other case
    assert near_duplicates(test, []) == [] and near_duplicates([""], [""]) == []
    with pytest.raises(DataError, match="threshold"):
        near_duplicates(test, train, threshold=0)
