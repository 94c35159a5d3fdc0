"""One module per stage type. Each holds its `Params` (defaults from the core configs), its `Stage`
(the pipelines.yaml entry: name, type, inputs, params), INPUTS (slot -> kind; `kind?` is optional),
OUTPUT (the kinds it provides) and its `run` body. Adding a stage type is one module and one line here.

A stage module imports torch, transformers, pandas and the trainers inside `run`, not at the top: loading
and validating pipelines.yaml reads every module's Params and takes half a second, so a mistake in the
file is reported at once.
"""

from tasks.stages import (
    dpo, evaluate, grpo, import_preferences, label, model, ppo, rloo, sample, sft, train_reward_model, world,
)

MODULES = {m.Stage.model_fields["type"].annotation.__args__[0]: m for m in (
    world, model, sft, sample, label, import_preferences, train_reward_model, dpo, ppo, grpo, rloo, evaluate,
)}
