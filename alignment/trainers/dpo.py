"""Direct Preference Optimization: the policy learns from preference pairs, no reward model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from alignment.data import PairExample, collate_pairs
from alignment.logprobs import sequence_logprobs
from alignment.losses import dpo_loss
from alignment.models import frozen_copy
from alignment.trainers.common import (
    Checkpointer,
    MetricsCallback,
    Optimization,
    TrainConfig,
    train_steps,
)


@dataclass(frozen=True)
class DPOConfig:
    train: TrainConfig  # optimisation settings
    beta: float = 0.1  # strength of the implicit KL constraint to the reference
    loss_type: str = "sigmoid"  # "sigmoid" (DPO) or "ipo"
    label_smoothing: float = 0.0  # eps of conservative DPO: assumed probability that a label is flipped
    max_length: int = 128  # prompt + answer tokens per sequence
    precompute_ref_logps: bool = True  # reference log-probs computed once up front, not every step


def pair_logps(model, examples: Sequence[PairExample], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen_logps [B], rejected_logps [B]) of the answers, one concatenated forward of 2B rows."""
    input_ids, attention_mask, answer_mask = (t.to(device) for t in collate_pairs(examples, pad_token_id))
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # [2B, T, V]
    _, seq_logps = sequence_logprobs(logits, input_ids, answer_mask)  # [2B]
    return seq_logps.chunk(2)


class DPOTrainer:
    """Data: PairExamples. Reference: a frozen copy of the starting policy unless one is given."""

    def __init__(
        self,
        model,
        examples: Sequence[PairExample],
        pad_token_id: int,
        cfg: DPOConfig,
        ref_model=None,
        reference_logps: torch.Tensor | None = None,
        output_dir: str | Path | None = None,
        callback: MetricsCallback | None = None,
    ):
        self.cfg, self.examples, self.pad_token_id, self.callback = cfg, list(examples), pad_token_id, callback
        self.ref_model = ref_model if ref_model is not None or reference_logps is not None else frozen_copy(model)
        self.opt = Optimization(model, cfg.train)
        if self.ref_model is not None:
            self.ref_model.to(self.opt.device)
        self.sampler = self.opt.sampler(len(self.examples))
        self.checkpointer = Checkpointer.under(output_dir)
        self.reference_logps = reference_logps  # [N, 2]: (chosen, rejected) per example
        if self.reference_logps is None and cfg.precompute_ref_logps:
            self.reference_logps = self.compute_reference_logps()

    @torch.no_grad()
    def compute_reference_logps(self, batch_size: int = 32) -> torch.Tensor:
        """log pi_ref of every chosen and rejected answer, once. Returns [N, 2] on the CPU."""
        rows = []
        for i in range(0, len(self.examples), batch_size):
            chosen, rejected = pair_logps(self.ref_model, self.examples[i : i + batch_size], self.pad_token_id, self.opt.device)
            rows.append(torch.stack([chosen, rejected], dim=-1).float().cpu())
        return torch.cat(rows)  # [N, 2]

    def micro_loss(self, indices: list[int]):
        examples = [self.examples[i] for i in indices]
        policy_chosen_logps, policy_rejected_logps = pair_logps(self.opt.model, examples, self.pad_token_id, self.opt.device)
        if self.reference_logps is not None:
            ref = self.reference_logps[indices].to(self.opt.device)  # [B, 2]
            ref_chosen_logps, ref_rejected_logps = ref[:, 0], ref[:, 1]
        else:
            with torch.no_grad():
                ref_chosen_logps, ref_rejected_logps = pair_logps(self.ref_model, examples, self.pad_token_id, self.opt.device)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
            self.cfg.beta, self.cfg.loss_type, self.cfg.label_smoothing,
        )
        metrics = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margin": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": policy_chosen_logps.detach().mean(),
            "logps/rejected": policy_rejected_logps.detach().mean(),
        }
        return losses.mean(), metrics

    def train(self, stop_at: int | None = None) -> list[dict[str, float]]:
        self.opt.model.train()
        return train_steps(self.opt, self.sampler, self.micro_loss, self.checkpointer, self.callback, stop_at, "dpo")

    @property
    def model(self):
        return self.opt.accelerator.unwrap_model(self.opt.model)
