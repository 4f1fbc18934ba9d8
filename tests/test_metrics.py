"""Task metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest

from tunesmith.evaluation import metrics as M


def test_classification_report_hand_computed():
    refs = ["a", "a", "a", "b", "b", "c"]
    preds = ["a", "a", "b", "b", None, "a"]  # None: a generation that named no label
    r = M.classification_report(refs, preds, ["a", "b", "c"])
    assert r["accuracy"] == pytest.approx(3 / 6)
    # a: tp 2, fp 1 (the c), fn 1 -> P 2/3, R 2/3, F1 2/3; b: tp 1, fp 1, fn 1 -> 1/2; c: tp 0 -> 0
    assert r["per_label"]["a"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3})
    assert r["per_label"]["b"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert r["per_label"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert r["macro_f1"] == pytest.approx((2 / 3 + 0.5 + 0) / 3)
    # rows = reference, columns = prediction; the invalid (None) prediction is in no cell
    assert r["confusion"] == [[2, 1, 0], [0, 1, 0], [1, 0, 0]]


def test_prf_zero_denominators():
    assert M.prf(0, 0, 0) == (0.0, 0.0, 0.0)
    assert M.prf(1, 1, 0) == pytest.approx((0.5, 1.0, 2 / 3))


@pytest.mark.parametrize(
    "pred, ref, em, f1",
    [
        ("The cat sat", "the  cat sat", 1.0, 1.0),
        ("the cat sat", "the cat", 0.0, 0.8),  # P 2/3, R 1
        ("cat, cat!", "cat", 0.0, 2 / 3),  # P 1/2, R 1 (multiset overlap)
        ("dog", "cat", 0.0, 0.0),
        ("", "", 1.0, 1.0),
    ],
)
def test_exact_match_and_token_f1(pred, ref, em, f1):
    assert M.exact_match(pred, ref) == em
    assert M.token_f1(pred, ref) == pytest.approx(f1)


def test_lcs_and_rouge_l():
    assert M.lcs_length("ABCBDAB", "BDCABA") == 4  # the textbook example (BCBA)
    assert M.lcs_length([], [1, 2]) == 0
    # pred: a b c d (4 words), ref: a c e (3 words); LCS "a c" = 2 -> P 1/2, R 2/3, F1 4/7
    assert M.rouge_l("a b c d", "a c e") == pytest.approx(4 / 7)
    assert M.rouge_l("x", "y") == 0.0


def test_chrf_scale_and_sacrebleu_agreement():
    from sacrebleu.metrics import CHRF

    assert M.chrf(["the same text"], ["the same text"]) == pytest.approx(1.0)
    assert M.chrf(["aaaa"], ["zzzz"]) == 0.0
    hyp, ref = ["the cat sat on the mat"], ["a cat sat on a mat"]
    assert M.chrf(hyp, ref) == pytest.approx(CHRF().corpus_score(hyp, [ref]).score / 100)
    assert 0 < M.sentence_chrf(hyp[0], ref[0]) < 1


def test_perplexity():
    assert M.perplexity(2 * math.log(4), 2) == pytest.approx(4.0)
    assert M.perplexity(1.0, 0) == math.inf


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"a": 1}', {"a": 1}),
        ('  ```json\n{"a": 1}\n```  ', {"a": 1}),
        ("[1, 2]", None),  # JSON, but not an object
        ('{"a": 1} and more', None),
        ("not json", None),
    ],
)
def test_parse_json_object(text, expected):
    assert M.parse_json_object(text) == expected


def test_flatten_and_schema():
    refs = [
        {"name": "A", "qty": 2, "addr": {"city": "X"}},
        {"name": "B", "qty": 1.5, "addr": {"city": "Y"}, "note": None},
    ]
    assert M.flatten(refs[0]) == {"name": "A", "qty": 2, "addr.city": "X"}
    schema = M.infer_schema(refs)
    assert schema["required"] == {"name", "qty", "addr.city"}
    assert M.matches_schema({"name": "C", "qty": 3, "addr": {"city": "Z"}}, schema)
    assert M.matches_schema({"name": "C", "qty": 3, "addr": {"city": "Z"}, "note": None}, schema)  # optional key
    assert not M.matches_schema({"name": "C", "addr": {"city": "Z"}}, schema)  # missing key
    assert not M.matches_schema({"name": "C", "qty": "3", "addr": {"city": "Z"}}, schema)  # wrong type
    assert not M.matches_schema({"name": "C", "qty": 3, "addr": {"city": "Z"}, "extra": 1}, schema)  # unknown key
    assert not M.matches_schema(None, schema)


def test_extraction_report_hand_computed():
    refs = [{"name": "Alice", "qty": 3, "addr": {"city": "Oslo"}}, {"name": "Bob", "qty": 1, "addr": {"city": "Rome"}}]
    preds = [
        '{"name": "alice ", "qty": 3.0, "addr": {"city": "Paris"}}',  # 2 of 3 pairs right (case/space/number normalised)
        "sorry, I cannot",  # does not parse: 0 predicted, 3 missed
    ]
    metrics, per = M.extraction_report(preds, refs)
    assert metrics["parse_rate"] == 0.5
    assert metrics["schema_match_rate"] == 0.5
    assert metrics["exact_match"] == 0.0
    # tp 2, fp 1, fn 1 + 3 -> P 2/3, R 2/6, F1 = 2 * (2/3 * 1/3) / (2/3 + 1/3) = 4/9
    assert metrics["field_precision"] == pytest.approx(2 / 3)
    assert metrics["field_recall"] == pytest.approx(1 / 3)
    assert metrics["field_f1"] == pytest.approx(4 / 9)
    assert per == pytest.approx([2 / 3, 0.0])
    same, _ = M.extraction_report(['{"qty": 1, "name": "BOB", "addr": {"city": "rome"}}'], refs[1:])
    assert same["exact_match"] == 1.0 and same["field_f1"] == 1.0


def test_text_report():
    metrics, per = M.text_report(["the cat sat", "dog"], ["the cat", "dog"])
    assert metrics["exact_match"] == 0.5
    assert metrics["token_f1"] == pytest.approx((0.8 + 1.0) / 2)
    assert metrics["rouge_l"] == pytest.approx((0.8 + 1.0) / 2)
    assert per["exact_match"] == [0.0, 1.0]
    assert per["chrf"][1] == pytest.approx(1.0)
