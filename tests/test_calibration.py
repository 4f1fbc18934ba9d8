"""Contextual calibration (evaluation/calibration.py) on numbers worked out by hand."""

from __future__ import annotations

import math

import pytest

from tunesmith.evaluation import calibration as C


def test_content_free_inputs_are_the_papers():
    assert C.CONTENT_FREE == ("N/A", "", "[MASK]")


def test_label_distribution_is_a_softmax_over_the_labels():
    # raw label probabilities 0.07 and 0.03 (the rest of the mass is on other text) -> 0.7, 0.3
    assert C.label_distribution([math.log(0.07), math.log(0.03)]) == pytest.approx([0.7, 0.3])
    # log-sum-exp: very negative summed log-probs do not underflow; e^-1000 alone is 0.0 in floats
    # softmax(-1000, -1001) = (1, e^-1) / (1 + e^-1)
    assert C.label_distribution([-1000.0, -1001.0]) == pytest.approx([0.7310585786, 0.2689414214])
    assert C.label_distribution([math.log(0.5), -math.inf]) == [1.0, 0.0]


def test_calibration_divides_by_the_prior_and_flips_the_prediction():
    # p = (0.7, 0.3), p_cf = (0.8, 0.2): (0.7/0.8, 0.3/0.2) = (0.875, 1.5), / 2.375 = (0.368421..., 0.631578...)
    logprobs = [math.log(0.7), math.log(0.3)]
    prior = [0.8, 0.2]
    assert C.calibrate(logprobs, prior) == pytest.approx([0.3684210526, 0.6315789474])
    assert C.predict(logprobs) == 0
    assert C.predict(logprobs, prior=prior) == 1
    # unnormalised label scores (0.07, 0.03) calibrate the same: only their ratio matters
    assert C.calibrate([math.log(0.07), math.log(0.03)], prior) == pytest.approx([0.3684210526, 0.6315789474])


def test_calibration_with_three_labels():
    # p = (0.5, 0.3, 0.2), p_cf = (0.5, 0.25, 0.25): (1.0, 1.2, 0.8) / 3.0 = (0.3333, 0.4, 0.2667)
    logprobs = [math.log(0.5), math.log(0.3), math.log(0.2)]
    assert C.calibrate(logprobs, [0.5, 0.25, 0.25]) == pytest.approx([1 / 3, 0.4, 0.8 / 3])
    assert C.predict(logprobs) == 0
    assert C.predict(logprobs, prior=[0.5, 0.25, 0.25]) == 1


def test_a_uniform_prior_changes_nothing():
    logprobs = [math.log(0.6), math.log(0.1), math.log(0.3)]
    assert C.calibrate(logprobs, [1 / 3, 1 / 3, 1 / 3]) == pytest.approx([0.6, 0.1, 0.3])


def test_prior_averages_the_normalised_distributions_of_the_content_free_inputs():
    cf = [
        [math.log(0.09), math.log(0.01)],  # "N/A":    raw (0.09, 0.01) -> normalised (0.9, 0.1)
        [math.log(0.2), math.log(0.2)],  # "":       (0.5, 0.5)
        [math.log(0.7), math.log(0.3)],  # "[MASK]": (0.7, 0.3)
    ]
    # ((0.9 + 0.5 + 0.7) / 3, (0.1 + 0.5 + 0.3) / 3) = (0.7, 0.3)
    prior = C.content_free_prior(cf)
    assert prior == pytest.approx([0.7, 0.3])
    # not the mean of the raw probabilities, normalised after: (0.33, 0.17) / 0.5 = (0.66, 0.34)
    assert prior != pytest.approx([0.66, 0.34])
    # an example scored exactly like the average content-free input carries no information: (0.5, 0.5)
    assert C.calibrate([math.log(0.7), math.log(0.3)], prior) == pytest.approx([0.5, 0.5])
    # one content-free input: its own distribution
    assert C.content_free_prior([[math.log(0.09), math.log(0.01)]]) == pytest.approx([0.9, 0.1])


def test_length_normalisation_flips_a_prediction():
    # "billing" (1 token) sums to -2.0, "technical support" (3 tokens) to -4.5: by sum, label 0
    logprobs = [-2.0, -4.5]
    assert C.predict(logprobs) == 0
    # per token: -2.0 vs -1.5: label 1
    assert C.length_normalise(logprobs, [1, 3]) == [-2.0, -1.5]
    assert C.predict(logprobs, token_counts=[1, 3]) == 1
    # softmax(-2.0, -1.5) = (1, e^0.5) / (1 + e^0.5)
    assert C.label_distribution(C.length_normalise(logprobs, [1, 3])) == pytest.approx([0.3775406688, 0.6224593312])


def test_length_normalisation_applies_to_the_prior_too():
    # content-free scores (-1.0, -3.0) over (1, 3) tokens: per token (-1.0, -1.0) -> prior (0.5, 0.5)
    assert C.content_free_prior([[-1.0, -3.0]], token_counts=[1, 3]) == pytest.approx([0.5, 0.5])
    assert C.content_free_prior([[-1.0, -3.0]]) == pytest.approx([0.8807970780, 0.1192029220])  # (1, e^-2)/(1+e^-2)
    # test scores (-1.2, -3.0): per token (-1.2, -1.0) -> label 1 with the matching (uniform) prior
    prior = C.content_free_prior([[-1.0, -3.0]], token_counts=[1, 3])
    assert C.predict([-1.2, -3.0], prior=prior, token_counts=[1, 3]) == 1
    # summed scores with the summed prior: softmax(-1.2, -3.0) = (0.8581, 0.1419); / (0.8808, 0.1192): label 1 too
    assert C.predict([-1.2, -3.0], prior=C.content_free_prior([[-1.0, -3.0]])) == 1
    assert C.predict([-1.2, -3.0]) == 0


def test_ties_go_to_the_first_label():
    assert C.predict([-1.0, -1.0, -1.0]) == 0
    assert C.predict([math.log(0.4), math.log(0.2)], prior=[0.4, 0.2]) == 0  # calibrated (0.5, 0.5)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError):
        C.label_distribution([])
    with pytest.raises(ValueError):
        C.label_distribution([-math.inf, -math.inf])
    with pytest.raises(ValueError):
        C.label_distribution([float("nan"), 0.0])
    with pytest.raises(ValueError):
        C.calibrate([-1.0, -2.0], [0.5, 0.3, 0.2])
    with pytest.raises(ValueError):
        C.calibrate([-1.0, -2.0], [1.0, 0.0])
    with pytest.raises(ValueError):
        C.content_free_prior([])
    with pytest.raises(ValueError):
        C.content_free_prior([[-1.0, -2.0], [-1.0]])
    with pytest.raises(ValueError):
        C.length_normalise([-1.0, -2.0], [1, 0])
    with pytest.raises(ValueError):
        C.predict([-1.0, -2.0], token_counts=[1])
