"""Supervised fine-tuning: maximise log pi(y|x) of demonstration answers (answer tokens only)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from alignment.config import SFTConfig  # noqa: F401 - re-exported
from alignment.data import collate_answers
from alignment.logprobs import answer_logprobs
from alignment.prefix import SharedPrefixBatch, collate_answers_shared, shared_prefix_logps
from alignment.trainers.common import (
    Checkpointer,
    MetricsCallback,
    Optimization,
    train_steps,
)


class AnswerLogps(nn.Module):
    """The trained module: a policy whose forward gives answer log-probs, so DDP/FSDP wrappers see the call while
    the policy inside sends only answer positions through its LM head (alignment.logprobs). Takes a packed batch
    (returns each example's summed log-prob [B, 1]) or padded rows (input_ids, attention_mask, answer_mask:
    returns per-token log-probs [B, T])."""

    def __init__(self, policy):
        super().__init__()
        self.policy = policy

    def forward(self, batch: SharedPrefixBatch | tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        if isinstance(batch, SharedPrefixBatch):
            return shared_prefix_logps(self.policy, batch)
        return answer_logprobs(self.policy, *batch)


class SFTTrainer:
    """Data: (prompt_ids, answer_ids) pairs. Loss: mean negative log-likelihood per answer token."""

    def __init__(
        self,
        model,
        examples: Sequence[tuple[list[int], list[int]]],
        pad_token_id: int,
        cfg: SFTConfig,
        output_dir: str | Path | None = None,
        callback: MetricsCallback | None = None,
    ):
        self.cfg, self.examples, self.pad_token_id, self.callback = cfg, list(examples), pad_token_id, callback
        self.opt = Optimization(AnswerLogps(model), cfg.train)
        self.sampler = self.opt.sampler(len(self.examples), [len(p) + len(a) for p, a in self.examples])
        self.checkpointer = Checkpointer.under(output_dir)

    def micro_loss(self, indices: list[int]):
        prompts = [self.examples[i][0] for i in indices]
        answers = [self.examples[i][1] for i in indices]
        if self.cfg.packing:
            batch = collate_answers_shared([(p, [a]) for p, a in zip(prompts, answers)], self.pad_token_id, pack=True)
            n_tokens = batch.target_mask.sum().to(self.opt.device)
            return -self.opt.model(batch.to(self.opt.device)).sum() / n_tokens, {"tokens": n_tokens.float()}
        input_ids, attention_mask, answer_mask = (
            t.to(self.opt.device) for t in collate_answers(prompts, answers, self.pad_token_id)
        )
        token_logps = self.opt.model((input_ids, attention_mask, answer_mask))  # [B, T]
        n_tokens = answer_mask[:, 1:].sum().clamp(min=1)
        loss = -token_logps.sum() / n_tokens
        return loss, {"tokens": n_tokens.float()}

    def micro_size(self, indices: list[int]) -> int:
        """What micro_loss is a mean over: the answer tokens (so accumulation weighs micro-batches by them)."""
        return sum(len(self.examples[i][1]) for i in indices)

    def train(self, stop_at: int | None = None) -> list[dict[str, float]]:
        self.opt.model.train()
        return train_steps(self.opt, self.sampler, self.micro_loss, self.checkpointer, self.callback, stop_at, "sft",
                           self.micro_size)

    @property
    def model(self):
        return self.opt.accelerator.unwrap_model(self.opt.model).policy
