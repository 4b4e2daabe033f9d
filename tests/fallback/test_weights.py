import pytest

from labelcascade.fallback import sample_weights


def test_people_outweigh_the_llm_and_corrections_outweigh_all():
    weights = sample_weights(["gold", "review", "llm", "llm"], [1.0, 1.0, 0.9, 0.6])
    assert weights.tolist() == pytest.approx([1.0, 2.0, 0.45, 0.3])


def test_unknown_source_and_length_mismatch_are_refused():
    with pytest.raises(ValueError):
        sample_weights(["guess"], [1.0])
    with pytest.raises(ValueError, match="2 sources but 1 confidences"):
        sample_weights(["gold", "llm"], [1.0])
