"""Direct Preference Optimization: the policy learns from preference pairs, no reward model."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from alignment.config import DPOConfig  # noqa: F401 - re-exported
from alignment.data import PairExample, collate_pairs
from alignment.logprobs import answer_logprobs
from alignment.losses import dpo_loss
from alignment.lora import has_adapters, reference_mode
from alignment.models import frozen_copy
from alignment.prefix import (PromptGroup, collate_groups, collate_shared_prefix, group_by_prompt, pair_count, pair_values,
                              segments_on_cpu, shared_prefix_logps)
from alignment.trainers.common import (
    Checkpointer,
    MetricsCallback,
    Optimization,
    train_steps,
)


def pair_logps(model, examples: Sequence[PairExample], pad_token_id: int, device, shared_prefix: bool = True,
               pack: bool | int = False):
    """(chosen_logps [B], rejected_logps [B]) of the answers in one forward pass.

    shared_prefix: B rows prompt ++ chosen ++ rejected (alignment.prefix; pack: several pairs a row); otherwise
    2B padded rows prompt ++ answer, chosen rows then rejected rows.
    """
    if shared_prefix:
        return shared_prefix_logps(model, collate_shared_prefix(examples, pad_token_id, pack).to(device)).unbind(-1)
    input_ids, attention_mask, answer_mask = (t.to(device) for t in collate_pairs(examples, pad_token_id))
    seq_logps = answer_logprobs(model, input_ids, attention_mask, answer_mask).sum(-1)  # [2B]
    return seq_logps.chunk(2)


def group_logps(model, groups: Sequence[PromptGroup], pad_token_id: int, device, pack: bool | int = False) -> torch.Tensor:
    """log pi(answer | prompt) of every answer of every group: [B, K] (one row per group, or several a row: pack)."""
    return shared_prefix_logps(model, collate_groups(groups, pad_token_id, pack).to(device))


class PairLogps(nn.Module):
    """The trained module: a policy whose forward gives the log-probs of pairs (a tuple chosen, rejected)
    or of prompt groups ([B, K]), so DDP/FSDP wrappers see the call."""

    def __init__(self, policy, pad_token_id: int, shared_prefix: bool, pack: bool | int = False):
        super().__init__()
        self.policy, self.pad_token_id, self.shared_prefix, self.pack = policy, pad_token_id, shared_prefix, pack

    def forward(self, items: Sequence[PairExample] | Sequence[PromptGroup]):
        device = next(self.policy.parameters()).device
        if items and isinstance(items[0], PromptGroup):
            return group_logps(self.policy, items, self.pad_token_id, device, self.pack)
        return pair_logps(self.policy, items, self.pad_token_id, device, self.shared_prefix, self.pack)


class DPOTrainer:
    """Data: PairExamples. Reference: given, or the model itself with its LoRA adapters disabled (a
    PEFT model: no second copy of the weights), or else a frozen copy of the starting policy."""

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
        if ref_model is None and reference_logps is None and not has_adapters(model):
            ref_model = frozen_copy(model)
        self.ref_model = ref_model
        self.layout = cfg.micro_batch_tokens or cfg.packing  # collate_answers_shared's pack: a row width, or a flag
        self.opt = Optimization(PairLogps(model, pad_token_id, cfg.shared_prefix, self.layout), cfg.train,
                                cfg.micro_batch_tokens)
        if self.ref_model is not None:
            self.ref_model.to(self.opt.device)
        if cfg.shared_prefix or cfg.group_by_prompt:
            for m in (model, self.ref_model):
                if m is not None:
                    segments_on_cpu(m, self.opt.device, cfg.train.compile)
        self.groups = group_by_prompt(self.examples, max_tokens=cfg.micro_batch_tokens or None) if cfg.group_by_prompt else None
        units = self.groups if cfg.group_by_prompt else self.examples
        self.sampler = self.opt.sampler(len(units), [u.tokens for u in units], "pair" if self.groups is None else "prompt group")
        self.checkpointer = Checkpointer.under(output_dir)
        # [N, 2]: (chosen, rejected) per example; grouped: [G, K_max] per group answer, 0 where absent
        self.reference_logps = reference_logps
        expected = (len(self.groups), max(len(g.answers) for g in self.groups)) if self.groups else (len(self.examples), 2)
        if reference_logps is not None and tuple(reference_logps.shape) != expected:
            raise ValueError(f"reference_logps has shape {tuple(reference_logps.shape)}, expected {expected}")
        if self.reference_logps is None and cfg.precompute_ref_logps:
            self.reference_logps = self.compute_reference_logps()
        if self.reference_logps is not None:  # the reference is never run again: its copy of the weights goes
            self.ref_model = None

    @torch.no_grad()
    def ref_pair_logps(self, examples: Sequence[PairExample]) -> tuple[torch.Tensor, torch.Tensor]:
        """log pi_ref of chosen and rejected answers: the reference model, or the policy with adapters off."""
        if self.ref_model is not None:
            return pair_logps(self.ref_model, examples, self.pad_token_id, self.opt.device, self.cfg.shared_prefix, self.layout)
        with reference_mode(self.model) as policy:
            return pair_logps(policy, examples, self.pad_token_id, self.opt.device, self.cfg.shared_prefix, self.layout)

    @torch.no_grad()
    def ref_group_logps(self, groups: Sequence[PromptGroup]) -> torch.Tensor:
        """log pi_ref of every answer of each group: [B, K]."""
        if self.ref_model is not None:
            return group_logps(self.ref_model, groups, self.pad_token_id, self.opt.device, self.layout)
        with reference_mode(self.model) as policy:
            return group_logps(policy, groups, self.pad_token_id, self.opt.device, self.layout)

    @torch.no_grad()
    def compute_reference_logps(self, batch_size: int = 32) -> torch.Tensor:
        """log pi_ref of every answer, once: [N, 2] (chosen, rejected) per pair, or [G, K_max] per prompt
        group (0 where a group has fewer answers). On the CPU. Under several processes each computes every
        N-th chunk of `batch_size` and the chunks are summed over processes (the others' rows are 0 here,
        and x + 0 is x): every process gets the one-process table from 1/N of the forward passes."""
        acc = self.opt.accelerator
        units = self.groups if self.groups is not None else self.examples
        width = max(len(g.answers) for g in self.groups) if self.groups is not None else 2
        table = torch.zeros(len(units), width)
        for c, i in enumerate(range(0, len(units), batch_size)):
            if c % acc.num_processes != acc.process_index:
                continue
            if self.groups is not None:
                rows = self.ref_group_logps(self.groups[i : i + batch_size]).float().cpu()
            else:
                rows = torch.stack(self.ref_pair_logps(self.examples[i : i + batch_size]), dim=-1).float().cpu()
            table[i : i + len(rows), : rows.shape[1]] = rows
        if acc.num_processes > 1:
            table = acc.reduce(table.to(self.opt.device), reduction="sum").cpu()
        return table

    def micro_size(self, indices: list[int]) -> int:
        """What micro_loss is a mean over: pairs (a prompt group holds several)."""
        return pair_count(self.groups, indices)

    def micro_loss(self, indices: list[int]):
        if self.groups is not None:
            groups = [self.groups[i] for i in indices]
            policy = self.opt.model(groups)  # [B, K]
            if self.reference_logps is not None:
                ref = self.reference_logps[indices, : policy.shape[1]].to(self.opt.device)
            else:
                ref = self.ref_group_logps(groups)
            policy_chosen_logps, policy_rejected_logps = pair_values(policy, groups)
            ref_chosen_logps, ref_rejected_logps = pair_values(ref, groups)
        else:
            examples = [self.examples[i] for i in indices]
            policy_chosen_logps, policy_rejected_logps = self.opt.model(examples)
            if self.reference_logps is not None:
                ref = self.reference_logps[indices].to(self.opt.device)  # [B, 2]
                ref_chosen_logps, ref_rejected_logps = ref[:, 0], ref[:, 1]
            else:
                ref_chosen_logps, ref_rejected_logps = self.ref_pair_logps(examples)
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
        return train_steps(self.opt, self.sampler, self.micro_loss, self.checkpointer, self.callback, stop_at, "dpo",
                           self.micro_size)

    @property
    def model(self):
        """The policy being trained (unwrapped)."""
        return self.opt.accelerator.unwrap_model(self.opt.model).policy
