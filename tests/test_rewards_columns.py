"""Reward functions receive the prompt row's other columns as keyword arguments (as TRL passes a data
set's columns): those a function names, all of them with **kwargs, none to f(prompts, answers)."""

import pytest

from alignment.rewards import score


def exact(prompts, answers, answer=None):
    return [float(a.strip() == g) for a, g in zip(answers, answer)]


def everything(prompts, answers, **columns):
    return [float(len(columns))] * len(answers)


def plain(prompts, answers):
    return [1.0] * len(answers)


def test_a_function_gets_the_columns_it_names_and_kwargs_gets_all():
    columns = {"answer": ["4", "6"], "level": ["easy", "easy"]}
    total, each = score({"exact": exact, "everything": everything, "plain": plain}, {"plain": 0.5},
                        ["2+2?", "3+3?"], ["4", " 7"], columns)
    assert each["exact"].tolist() == [1.0, 0.0]
    assert each["everything"].tolist() == [2.0, 2.0]  # answer and level
    assert total.tolist() == pytest.approx([1.0 + 2.0 + 0.5, 0.0 + 2.0 + 0.5])
