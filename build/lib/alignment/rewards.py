"""Reward functions: f(prompts, answers) -> one float per answer, combined as sum_k w_k f_k.

Light on purpose (torch is imported when scores are computed), so that pipelines can name the error type
while they check a config.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Mapping, Sequence

if TYPE_CHECKING:
    import torch

RewardFn = Callable[..., Sequence[float]]
"""reward_fn(prompts, answers, **columns) -> one float per answer (a list, an array or a tensor). columns:
the other columns of each answer's prompt row (e.g. GSM8K's `answer`), one value an answer, as TRL passes a
data set's columns; a function receives those it names, or all of them when it takes **kwargs."""


def _accepted(fn: Callable, columns: Mapping[str, list]) -> dict[str, list]:
    """The columns fn takes: all with **kwargs, else those it names (f(prompts, answers) gets none)."""
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable: no columns
        return {}
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return dict(columns)
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in columns.items() if k in names}


class RewardFunctionError(ValueError):
    """A reward function failed or returned something other than one finite float per answer."""


def score(reward_fns: Mapping[str, RewardFn], weights: Mapping[str, float], prompts: list, answers: list[str],
          columns: Mapping[str, list] | None = None) -> tuple["torch.Tensor", dict[str, "torch.Tensor"]]:
    """sum_k w_k * f_k(prompts, answers, **columns) -> [B], and each function's own scores [B] (float32, CPU).

    Every function must return len(answers) finite numbers; otherwise RewardFunctionError names it."""
    import torch

    each = {}
    for name, fn in reward_fns.items():
        try:
            raw = fn(list(prompts), list(answers), **_accepted(fn, columns or {}))
        except RewardFunctionError as e:  # one that says what is wrong in its own words
            raise RewardFunctionError(f"reward function {name}: {e}") from None
        except Exception as e:  # noqa: BLE001 - a user's function: report it by name, with its own message
            raise RewardFunctionError(f"reward function {name} failed on a batch of {len(answers)} answers: "
                                      f"{type(e).__name__}: {e}") from e
        try:
            values = torch.as_tensor(raw.detach().cpu() if isinstance(raw, torch.Tensor) else raw, dtype=torch.float32).reshape(-1)
        except (TypeError, ValueError, RuntimeError):
            raise RewardFunctionError(f"reward function {name} returned {type(raw).__name__}, not one number per answer; "
                                      f"return a list of {len(answers)} floats") from None
        if len(values) != len(answers):
            raise RewardFunctionError(f"reward function {name} returned {len(values)} scores for {len(answers)} answers; "
                                      "return exactly one float per answer")
        if not torch.isfinite(values).all():
            bad = int((~torch.isfinite(values)).nonzero()[0])
            raise RewardFunctionError(f"reward function {name} returned {float(values[bad])} for answer {bad} "
                                      f"({answers[bad][:60]!r}); return a finite float for every answer")
        each[name] = values
    total = sum(weights.get(name, 1.0) * v for name, v in each.items())
    return total, each
