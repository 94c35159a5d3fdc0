"""Reward functions for answers that can be checked (a reward_functions entry of grpo, rloo and evaluate).

`exact_match` compares the final number of an answer with the gold answer of its prompt's row, GSM8K's
way: the gold `answer` column ends in "#### 72"; a model's answer counts by its "#### N" if it writes one,
else by its last number. Numbers compare as values ("72", "72.0", "$72", "1,000" = "1000").

    reward_functions: ["alignment.verifiable:exact_match"]   # the prompts file's `answer` column is the gold
"""

from __future__ import annotations

import re
from typing import Sequence

from alignment.rewards import RewardFunctionError

NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
FINAL = re.compile(r"####\s*(-?\$?\d[\d,]*(?:\.\d+)?)")


def final_number(text: str) -> float | None:
    """The value after "####" when the text has one, else its last number; None without a number."""
    found = FINAL.findall(text) or NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", "").replace("$", ""))
    except ValueError:
        return None


def exact_match(prompts: Sequence, answers: Sequence[str], answer: Sequence[str] | None = None) -> list[float]:
    """1.0 where the answer's final number equals the gold answer's (the prompts file's `answer` column, one
    value an answer), else 0.0."""
    if answer is None:
        raise RewardFunctionError("exact_match needs the gold answers: a prompts file with an 'answer' column "
                         "(map another name with columns: {your_name: answer})")
    out = []
    for given, gold in zip(answers, answer, strict=True):
        want, got = final_number(str(gold)), final_number(given)
        out.append(float(want is not None and got is not None and abs(want - got) < 1e-9))
    return out
