"""GSM8K-style exact match: the final number of an answer against the gold answer's "#### N"."""

import pytest

from alignment.rewards import RewardFunctionError
from alignment.verifiable import exact_match, final_number


def test_final_number_reads_the_marker_then_the_last_number():
    assert final_number("3 + 4 = 7 apples, then 7 * 2 = 14.\n#### 14") == 14.0
    assert final_number("She pays $1,250.50 in all") == 1250.5
    assert final_number("the answer is 18, not 20") == 20.0  # no marker: the last number
    assert final_number("no idea") is None


def test_exact_match_compares_values_with_the_gold_column():
    gold = ["Natalia sold 48/2 = 24 clips in May.\n#### 72", "#### 1000", "#### 5"]
    assert exact_match(["q1", "q2", "q3"], ["48 + 24 = 72", "It costs $1,000.", "about 6"], answer=gold) == [1.0, 1.0, 0.0]
    with pytest.raises(RewardFunctionError, match="needs the gold answers"):
        exact_match(["q"], ["1"])
