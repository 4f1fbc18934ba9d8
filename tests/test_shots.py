"""Few-shot example selection (evaluation/shots.py): label coverage, seeding, and similarity retrieval."""

from __future__ import annotations

import pytest

from tunesmith.data.example import Example, Message
from tunesmith.errors import ConfigError
from tunesmith.evaluation import shots as S

SYSTEM = "Classify the ticket: billing, technical, account or shipping. Answer with the label only."
LABELS = ["billing", "technical", "account", "shipping"]


def chat(user: str, answer: str, line: int = 0) -> Example:
    return Example(
        kind="chat",
        messages=[Message("system", SYSTEM), Message("user", user), Message("assistant", answer)],
        source=f"train.jsonl:{line}",
    )


def labelled_train(n: int = 40) -> list[Example]:
    return [chat(f"ticket number {i}", LABELS[i % len(LABELS)], i + 1) for i in range(n)]


def ids(exs) -> list[int]:
    return [id(ex) for ex in exs]


# ---- pick_shots -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [4, 5, 9])
def test_shots_cover_every_label(k):
    train = labelled_train()
    for seed in range(10):
        shots = S.pick_shots(train, k, LABELS, seed)
        assert len(shots) == k
        assert S.missing_labels(shots, LABELS) == []
        assert set(ids(shots)) <= set(ids(train)) and len(set(ids(shots))) == k


def test_fewer_shots_than_labels_needs_asking():
    train = labelled_train()
    with pytest.raises(ConfigError) as err:
        S.pick_shots(train, 3, LABELS, 0)
    assert "(4)" in str(err.value) and "--allow-missing-labels" in str(err.value)
    shots = S.pick_shots(train, 3, LABELS, 0, allow_missing_labels=True)
    assert len(shots) == 3 and len(S.missing_labels(shots, LABELS)) >= 1
    assert S.pick_shots(train, 0, LABELS, 0) == []  # zero-shot is no shots, not an error


def test_pick_shots_is_seeded():
    train = labelled_train()
    for k, labels in [(6, LABELS), (6, None), (2, LABELS)]:
        draws = [ids(S.pick_shots(train, k, labels, seed, allow_missing_labels=True)) for seed in range(5)]
        assert draws == [ids(S.pick_shots(train, k, labels, seed, allow_missing_labels=True)) for seed in range(5)]
        assert len({tuple(d) for d in draws}) > 1  # the seed matters


def test_labels_absent_from_training_are_skipped_and_reported_by_coverage():
    train = labelled_train()
    labels = [*LABELS, "refund"]
    shots = S.pick_shots(train, 5, labels, 0)
    assert len(shots) == 5
    assert S.missing_labels(shots, labels) == ["refund"]


def test_shot_pool_rules():
    train = [
        chat("a", "billing"),
        chat("b", "   "),  # no answer: nothing to show
        Example(kind="text", text="raw text"),
        Example(kind="preference", prompt="p", chosen="c", rejected="r"),
        Example(kind="completion", prompt="c1", completion="technical"),
    ]
    assert ids(S.shot_pool(train)) == [id(train[0]), id(train[4])]
    assert len(S.pick_shots(train, 50, None, 0)) == 2  # k is capped at the pool


# ---- input_text ---------------------------------------------------------------------------------------------


def test_input_text_is_the_last_user_turn_or_the_prompt():
    multi = Example(
        kind="chat",
        messages=[
            Message("system", "s"),
            Message("user", "first"),
            Message("assistant", "x"),
            Message("user", "second"),
            Message("assistant", "y"),
        ],
    )
    assert S.input_text(multi) == "second"
    assert S.input_text(Example(kind="completion", prompt="the prompt", completion="c")) == "the prompt"


# ---- ShotRetriever ------------------------------------------------------------------------------------------

TOY = [
    chat("I was charged twice for my invoice this month", "billing", 1),
    chat("The app crashes every time I open the settings page", "technical", 2),
    chat("Please reset my password, I am locked out of my account", "account", 3),
    chat("My parcel has not arrived and tracking shows no update", "shipping", 4),
    chat("Can I get a refund for the duplicate charge on my card", "billing", 5),
    chat("Error 500 when uploading files through the API", "technical", 6),
]


def test_the_most_similar_example_comes_last():
    retriever = S.ShotRetriever(TOY, 3)
    shots = retriever.shots_for(chat("Why was my invoice charged twice?", "billing"))
    assert len(shots) == 3
    assert shots[-1] is TOY[0]
    assert retriever.shots_for(chat("the settings page crashes the app", "technical"))[-1] is TOY[1]
    assert retriever.shots_for(chat("my parcel tracking shows nothing", "shipping"))[-1] is TOY[3]
    completion = Example(kind="completion", prompt="reset my password please", completion="account")
    assert retriever.shots_for(completion)[-1] is TOY[2]


def test_shots_are_in_ascending_similarity():
    from sklearn.metrics.pairwise import cosine_similarity

    retriever = S.ShotRetriever(TOY, len(TOY))
    query = chat("refund the duplicate charge on my invoice", "billing")
    shots = retriever.shots_for(query)
    vec = retriever._vectorizer
    sims = cosine_similarity(vec.transform([S.input_text(query)]), vec.transform([S.input_text(s) for s in shots]))[0]
    assert list(sims) == sorted(sims)
    assert sorted(ids(shots)) == sorted(ids(TOY))


def test_ties_go_to_the_earlier_training_example():
    train = [
        chat("hello there", "a", 1),
        chat("hello there", "b", 2),
        chat("hello there", "c", 3),
        chat("something else entirely", "d", 4),
    ]
    shots = S.ShotRetriever(train, 2).shots_for(chat("hello there", "z"))
    assert shots == [train[1], train[0]]  # ranked 0, 1; most similar (the first) last
    # a query sharing nothing with the training inputs: every similarity is 0, training order decides
    assert S.ShotRetriever(train, 2).shots_for(chat("qqqq", "z")) == [train[1], train[0]]


def test_an_exact_duplicate_of_the_query_is_excluded():
    train = [*TOY, chat("Why was my invoice charged twice?", "billing", 7)]
    retriever = S.ShotRetriever(train, 3)
    query = chat("Why was my invoice charged twice?", "billing")
    shots = retriever.shots_for(query)
    assert all(s is not train[-1] for s in shots) and len(shots) == 3
    assert shots[-1] is TOY[0]
    # the same input with another answer is a different example (a conflict in the data, not a leak): kept
    assert S.ShotRetriever(train, 3).shots_for(chat("Why was my invoice charged twice?", "account"))[-1] is train[-1]
    # with k = everything, the duplicate is the one left out
    every = S.ShotRetriever(train, len(train)).shots_for(query)
    assert sorted(ids(every)) == sorted(ids(TOY))


def test_retrieval_returns_only_training_examples():
    pool = [*TOY, Example(kind="text", text="I was charged twice for my invoice"), chat("invoice charged", "  ")]
    retriever = S.ShotRetriever(pool, 4)
    allowed = set(ids(TOY))
    queries = [
        chat("invoice charged twice", "billing"),
        chat("app crashes", "technical"),
        Example(kind="completion", prompt="where is my parcel", completion="shipping"),
        chat("", "other"),
    ]
    for shots in retriever.shots_for_many(queries):
        assert len(shots) == 4 and set(ids(shots)) <= allowed


def test_retrieval_is_deterministic_and_batching_changes_nothing(monkeypatch):
    train = [
        chat(f"ticket {i} about {topic}", LABELS[i % 4], i)
        for i, topic in enumerate(["invoices", "crashes", "passwords", "parcels", "refunds", "errors"] * 5)
    ]
    queries = [
        chat(f"a question on {w} number {i}", "billing")
        for i, w in enumerate(["invoices", "crash", "password", "parcel", "refund", "error", "nothing"])
    ]
    one = S.ShotRetriever(train, 4)
    single = [ids(one.shots_for(q)) for q in queries]
    assert [ids(s) for s in one.shots_for_many(queries)] == single
    assert [ids(s) for s in S.ShotRetriever(train, 4).shots_for_many(queries)] == single  # a fresh retriever
    monkeypatch.setattr(S, "QUERY_BATCH", 2)  # queries split over several batches
    assert [ids(s) for s in one.shots_for_many(queries)] == single
    # a query never changes what later queries get (the vectorizer is fitted on training data only)
    assert [ids(one.shots_for(q)) for q in reversed(queries)] == single[::-1]


def test_degenerate_retrievers():
    assert S.ShotRetriever(TOY, 0).shots_for(chat("invoice", "billing")) == []
    assert S.ShotRetriever([], 3).shots_for_many([chat("invoice", "billing")]) == [[]]
    assert S.ShotRetriever(TOY, 3).shots_for_many([]) == []
    assert len(S.ShotRetriever(TOY, 50).shots_for(chat("invoice", "billing"))) == len(TOY)
    empty_inputs = [chat("", "a", 1), chat("", "b", 2)]  # no text to vectorise: training order
    assert S.ShotRetriever(empty_inputs, 1).shots_for(chat("anything", "z")) == [empty_inputs[0]]


def test_importing_tunesmith_does_not_import_sklearn():
    import subprocess
    import sys

    code = "import sys, tunesmith.evaluation.shots, tunesmith.evaluation.calibration; print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
