"""Loop-count distributions: parsing, errors, summaries."""

import pytest

from loopformer.config import LoopDistribution


@pytest.mark.parametrize("text", ["uniform(3)", "fixed(0)", "uniform(5, 2)", "gamma(1, 2)", "poisson_lognormal(-1, 1)"])
def test_bad_distribution_is_rejected(text):
    with pytest.raises(ValueError, match="fixed|uniform|poisson|needs"):
        LoopDistribution.parse(text)


def test_distribution_text_round_trip():
    for text in ["fixed(3)", "uniform(2, 8)", "poisson_lognormal(8, 0.5)"]:
        assert str(LoopDistribution.parse(text)) == text


def test_means_and_typical_ranges():
    assert LoopDistribution.parse("uniform(8, 16)").mean() == 12
    assert LoopDistribution.parse("poisson_lognormal(8, 0.5)").mean() == 9
    assert LoopDistribution.parse("uniform(8, 16)").typical_range() == (8, 16)
    assert LoopDistribution.parse("poisson_lognormal(8, 0.5)", cap=20).typical_range() == (1, 20)
