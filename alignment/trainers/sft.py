"""Supervised fine-tuning: maximise log pi(y|x) of demonstration answers (answer tokens only)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from alignment.config import SFTConfig  # noqa: F401 - re-exported
from alignment.data import collate_answers
from alignment.prefix import AnswerLogps, collate_answers_shared
from alignment.trainers.common import (
    Checkpointer,
    MetricsCallback,
    Optimization,
    train_steps,
)


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
        self.opt = Optimization(AnswerLogps(model), cfg.train, cfg.micro_batch_tokens)
        self.sampler = self.opt.sampler(len(self.examples), [len(p) + len(a) for p, a in self.examples])
        self.checkpointer = Checkpointer.under(output_dir)

    def micro_loss(self, indices: list[int]):
        prompts = [self.examples[i][0] for i in indices]
        answers = [self.examples[i][1] for i in indices]
        if self.cfg.packing:
            batch = collate_answers_shared([(p, [a]) for p, a in zip(prompts, answers)], self.pad_token_id,
                                           pack=self.cfg.micro_batch_tokens or True)
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
