"""Reward-model training with the Bradley-Terry loss on preference pairs."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from alignment.config import RewardConfig  # noqa: F401 - re-exported
from alignment.data import PairExample, collate_pairs
from alignment.losses import reward_model_loss
from alignment.models import RewardModel
from alignment.prefix import PromptGroup, collate_groups, collate_shared_prefix, group_by_prompt, pair_count, pair_values, segments_on_cpu
from alignment.trainers.common import (
    Checkpointer,
    MetricsCallback,
    Optimization,
    train_steps,
)


class RewardTrainer:
    """Data: PairExamples. Chosen and rejected go through the model in one batch; with
    cfg.group_by_prompt the pairs are gathered per prompt (alignment.prefix.group_by_prompt) and the loss
    is the mean over all pairs of the prompts in a batch."""

    def __init__(
        self,
        model: RewardModel,
        examples: Sequence[PairExample],
        pad_token_id: int,
        cfg: RewardConfig,
        output_dir: str | Path | None = None,
        callback: MetricsCallback | None = None,
    ):
        self.cfg, self.examples, self.pad_token_id, self.callback = cfg, list(examples), pad_token_id, callback
        self.opt = Optimization(model, cfg.train, cfg.micro_batch_tokens)
        if cfg.shared_prefix or cfg.group_by_prompt:
            segments_on_cpu(model.model, self.opt.device, cfg.train.compile)
        self.layout = cfg.micro_batch_tokens or cfg.packing  # collate_answers_shared's pack: a row width, or a flag
        self.groups = group_by_prompt(self.examples, max_tokens=cfg.micro_batch_tokens or None) if cfg.group_by_prompt else None
        units = self.groups if cfg.group_by_prompt else self.examples
        self.sampler = self.opt.sampler(len(units), [u.tokens for u in units], "pair" if self.groups is None else "prompt group")
        self.checkpointer = Checkpointer.under(output_dir)

    def rewards(self, examples: Sequence[PairExample], model=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen_rewards [B], rejected_rewards [B]) from one forward pass."""
        model = model or self.opt.model
        if self.cfg.shared_prefix:
            batch = collate_shared_prefix(examples, self.pad_token_id, self.layout).to(self.opt.device)
            return model(shared=batch).unbind(-1)
        input_ids, attention_mask, _ = (t.to(self.opt.device) for t in collate_pairs(examples, self.pad_token_id))
        rewards = model(input_ids, attention_mask)  # [2B]
        return rewards.chunk(2)

    def group_rewards(self, groups: Sequence[PromptGroup], model=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(preferred [N], other [N]) over all N pairs of the prompt groups, each answer scored once, one
        forward pass (a row per group)."""
        model = model or self.opt.model
        return pair_values(model(shared=collate_groups(groups, self.pad_token_id, self.layout).to(self.opt.device)), groups)

    def micro_size(self, indices: list[int]) -> int:
        """What micro_loss is a mean over: pairs (a prompt group holds several)."""
        return pair_count(self.groups, indices)

    def micro_loss(self, indices: list[int]):
        if self.groups is not None:
            chosen, rejected = self.group_rewards([self.groups[i] for i in indices])
        else:
            chosen, rejected = self.rewards([self.examples[i] for i in indices])
        return reward_model_loss(chosen, rejected, self.cfg.margin, self.cfg.center_coef)

    def train(self, stop_at: int | None = None) -> list[dict[str, float]]:
        self.opt.model.train()
        return train_steps(self.opt, self.sampler, self.micro_loss, self.checkpointer, self.callback, stop_at, "reward model",
                           self.micro_size)

    @torch.no_grad()
    def evaluate(self, examples: Sequence[PairExample], batch_size: int = 64) -> dict[str, float]:
        """Accuracy (r_w > r_l) and mean margin on held-out pairs. With group_by_prompt, a row is a prompt with
        its distinct answers, each scored once (alignment.prefix.group_by_prompt), as training reads them
        (opt-in, as for training: a row grows with a prompt's answers)."""
        if not examples:
            return {"accuracy": float("nan"), "margin": float("nan"), "pairs": 0}
        model = self.model.eval()
        diffs = []
        if self.groups is not None:
            groups = group_by_prompt(examples, max_tokens=self.cfg.micro_batch_tokens or None)
            step = max(1, batch_size // 8)  # a group holds up to 16 answers
            for i in range(0, len(groups), step):
                chosen, rejected = self.group_rewards(groups[i : i + step], model)
                diffs.append(chosen - rejected)
        else:
            for i in range(0, len(examples), batch_size):
                chosen, rejected = self.rewards(examples[i : i + batch_size], model)
                diffs.append(chosen - rejected)
        diff = torch.cat(diffs)
        return {"accuracy": float((diff > 0).float().mean()), "margin": float(diff.mean()), "pairs": len(examples)}

    @property
    def model(self) -> RewardModel:
        return self.opt.accelerator.unwrap_model(self.opt.model)
