"""Reward functions named by import path in pipelines.yaml: `reward_functions: ["my_rewards:exact_match"]`.

A reward function is any callable f(prompts, answers) -> one float per answer. It is found as
`module:attribute` (a module on the Python path or in the working directory, e.g. my_rewards.py) or
`path/to/file.py:attribute`. The source file of its module is part of the stage's cache key, so editing
the function re-runs the stage. Loading problems (no such module, no such name, not callable) are reported
before any work starts; problems of a call (it raised, the wrong number of scores, NaN) stop the stage
with the function's name (alignment.trainers.group.score).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable

from alignment.rewards import RewardFunctionError
from tasks.store import file_hash

REWARD_MODEL = "reward_model"  # the name a stage's reward-model input has among its reward functions


def check_spec(spec: str) -> str:
    """'module:attr' or 'file.py:attr' (for the config's validation: no import)."""
    module, sep, attr = spec.rpartition(":")
    if not sep or not module or not attr.isidentifier():
        raise ValueError(f"reward function {spec!r}: write it as module:function (e.g. my_rewards:exact_match) "
                         "or path/to/file.py:function")
    return spec


def _module(spec: str, module: str) -> ModuleType:
    if module.endswith(".py"):
        path = Path(module)
        if not path.is_file():
            raise RewardFunctionError(f"reward function {spec}: no file {path} (a relative path is read from the "
                                      f"working directory {Path.cwd()})")
        name = f"alignflow_reward_{file_hash(path)[:12]}"
        if name not in sys.modules:
            loader = importlib.util.spec_from_file_location(name, path)
            mod = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(mod)
            sys.modules[name] = mod
        return sys.modules[name]
    if os.getcwd() not in sys.path:  # my_rewards.py next to pipelines.yaml, as `python -m` would find it
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            raise RewardFunctionError(f"reward function {spec}: no module {module!r} in the working directory "
                                      f"{Path.cwd()} or the installed packages; check the name, or give a file as "
                                      "path/to/file.py:function") from None
        raise RewardFunctionError(f"reward function {spec}: its module imports {e.name!r}, which is not installed") from None


def load(spec: str) -> Callable:
    """The callable that `spec` names; RewardFunctionError if there is none."""
    module, _, attr = check_spec(spec).rpartition(":")
    try:
        mod = _module(spec, module)
    except RewardFunctionError:
        raise
    except Exception as e:  # noqa: BLE001 - a user's module failed while importing: say so, with its message
        raise RewardFunctionError(f"reward function {spec}: importing {module} failed: {type(e).__name__}: {e}") from None
    fn = getattr(mod, attr, None)
    if fn is None:
        names = sorted(n for n, v in vars(mod).items() if callable(v) and not n.startswith("_"))[:12]
        raise RewardFunctionError(f"reward function {spec}: {module} has no {attr!r}; it has {names}")
    if not callable(fn):
        raise RewardFunctionError(f"reward function {spec}: {attr} is a {type(fn).__name__}, not a function")
    return fn


def source_hashes(specs: list[str]) -> dict[str, str]:
    """spec -> hash of the source file of its module, for the stage's cache key."""
    out = {}
    for spec in specs:
        mod = sys.modules.get(getattr(load(spec), "__module__", ""), None)
        path = getattr(mod, "__file__", None)
        out[f"reward_function:{spec}"] = file_hash(Path(path)) if path else spec
    return out
