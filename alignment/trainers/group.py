"""Critic-free online RL: GRPO (and Dr. GRPO, DAPO's loss and clip-higher) and RLOO.

One iteration: take prompts_per_batch prompts, sample group_size answers to each (one sampler call,
KV cache) -> score every answer with the reward functions (a reward model is one of them) -> advantages
from the group's scores (GRPO: (r - mean) / std; Dr. GRPO: r - mean; RLOO: r - mean of the others, with
the KL penalty in r) -> `epochs` passes of clipped-surrogate updates (alignment.losses.group_policy_loss:
GRPO's per token with the ratio-weighted k3 KL, RLOO's per answer).
No value model: the other answers to the same prompt are the baseline.

The reference policy is needed only when beta > 0: a frozen copy, or the policy with its LoRA adapters off.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from alignment.advantages import group_advantages, leave_one_out_advantages
from alignment.config import GRPOConfig, RLOOConfig  # noqa: F401 - re-exported
from alignment.data import Prompt, encode_prompt, pad
from alignment.logprobs import answer_logprobs
from alignment.lora import has_adapters, reference_mode
from alignment.losses import group_policy_loss, kl_k1
from alignment.models import frozen_copy, position_ids_from_mask
from alignment.prefix import AnswerLogps
from alignment.sampling import sample_within_memory, stop_token_ids
from alignment.rewards import RewardFn, RewardFunctionError, score  # noqa: F401 - re-exported
from alignment.trainers.common import Checkpointer, MetricsCallback, Optimization
from alignment.trainers.rows import Ledger, RolloutShard, StepSampler, minibatch, stream_seed

ADVANTAGES = {"grpo": ("grpo", "batch_std", "dr_grpo"), "rloo": ("rloo",)}


class GroupTrainer:
    """GRPO or RLOO, chosen by the config's type: GRPOConfig or RLOOConfig."""

    def __init__(
        self,
        model,
        tokenizer,
        prompts: Sequence[Prompt],
        reward_fns: Mapping[str, RewardFn],
        cfg: GRPOConfig,
        reward_weights: Mapping[str, float] | None = None,
        ref_model=None,
        output_dir: str | Path | None = None,
        callback: MetricsCallback | None = None,
        prompt_columns: Sequence[Mapping] | None = None,  # each prompt's other columns, for the reward functions
    ):
        family = "rloo" if isinstance(cfg, RLOOConfig) else "grpo"
        if cfg.advantage not in ADVANTAGES[family]:
            raise ValueError(f"advantage {cfg.advantage!r} is not one of {family}'s: {list(ADVANTAGES[family])}")
        if not reward_fns:
            raise ValueError("give at least one reward function (a reward model counts as one)")
        unknown = set(reward_weights or {}) - set(reward_fns)
        if unknown:
            raise ValueError(f"weights for unknown reward functions {sorted(unknown)}; known: {sorted(reward_fns)}")
        self.cfg, self.tokenizer, self.prompts, self.callback = cfg, tokenizer, list(prompts), callback
        self.reward_fns, self.reward_weights = dict(reward_fns), dict(reward_weights or {})
        self.prompt_columns = list(prompt_columns) if prompt_columns is not None else [{} for _ in self.prompts]
        if cfg.beta and ref_model is None and not has_adapters(model):
            ref_model = frozen_copy(model)  # before the optimizer wraps the model
        self.opt = Optimization(AnswerLogps(model), cfg.train_config())  # under DDP too, the LM head in chunks
        # no KL term (beta 0): no reference is kept; with LoRA adapters it is the policy with them off (None)
        self.ref_model = ref_model.to(self.opt.device) if cfg.beta and ref_model is not None else None
        self.prompt_sampler = StepSampler(len(self.prompts), cfg.prompts_per_batch, cfg.seed)
        self.shard = RolloutShard(self.opt.accelerator, cfg.prompts_per_batch, cfg.group_size)  # this process's prompts
        self.checkpointer = Checkpointer.under(output_dir)
        self.ledger = Ledger.under(output_dir, self.opt.accelerator.is_main_process)
        self.iteration = 0
        self.stop_ids = stop_token_ids(cfg.sampling, tokenizer, model)  # EOS, the template's end of turn, ...
        self.batch_size = cfg.prompts_per_batch * cfg.group_size  # answers a rollout, over all processes
        self.minibatch_size = cfg.minibatch_size or self.batch_size
        # old log-probs differ from the current ones only after an update inside the same rollout batch
        self.needs_old_logps = cfg.epochs > 1 or self.minibatch_size < self.batch_size

    @property
    def model(self):
        return self.opt.accelerator.unwrap_model(self.opt.model).policy

    # -- rollouts ------------------------------------------------------------------------------
    @torch.no_grad()
    def token_logps(self, sequences: torch.Tensor, attention_mask: torch.Tensor, mask: torch.Tensor, reference: bool = False
                    ) -> torch.Tensor:
        """Per-token log-probs [B, T] of the policy (or the reference), a minibatch of rows at a time."""
        out = []
        for i in range(0, len(sequences), self.minibatch_size):
            ids, am = sequences[i : i + self.minibatch_size], attention_mask[i : i + self.minibatch_size]
            args = (ids, am, mask[i : i + self.minibatch_size], position_ids_from_mask(am), self.cfg.sampling.temperature)
            if not reference:
                out.append(answer_logprobs(self.model, *args))
            elif self.ref_model is not None:
                out.append(answer_logprobs(self.ref_model, *args))
            else:
                with reference_mode(self.model) as policy:
                    out.append(answer_logprobs(policy, *args))
        return torch.cat(out)

    @torch.no_grad()
    def rollout(self, batch_prompts: list[int]) -> dict[str, torch.Tensor]:
        """Sample group_size answers to each of this process's prompts of the batch (prompt indices, all
        processes'), score them, and compute their advantages. Tensors are this process's rows; "stats" and
        "tokens" are the whole batch's."""
        cfg, device, pad_id, shard = self.cfg, self.opt.device, self.tokenizer.pad_token_id, self.shard
        prompt_indices = shard.mine(batch_prompts)
        prompts = [self.prompts[i] for i in prompt_indices for _ in range(cfg.group_size)]  # [B], groups contiguous
        self.model.eval()
        # padded to the whole batch's longest prompt, so that every process's rows are the one-process rows
        encoded = [encode_prompt(self.tokenizer, self.prompts[i]) for i in batch_prompts]
        prompt_ids, prompt_mask = pad(shard.mine(encoded), pad_id, side="left", width=max(map(len, encoded)))
        params = dataclasses.replace(cfg.sampling, stop_token_ids=self.stop_ids)
        out = sample_within_memory(self.model, prompt_ids.to(device), prompt_mask.to(device), params, pad_id,
                                   stream_seed(cfg.seed, "rollout", self.iteration), rows=(shard.first_row, shard.total_rows),
                                   answers_per_prompt=cfg.group_size)  # a prompt computed once
        mask = torch.zeros_like(out.attention_mask)  # [B, P + N], 1 on answer tokens
        mask[:, out.prompt_length :] = out.answer_mask
        answers = self.tokenizer.batch_decode(
            [ids[m.bool()].tolist() for ids, m in zip(out.answer_ids, out.answer_mask)], skip_special_tokens=True
        )
        names = {k for i in prompt_indices for k in self.prompt_columns[i]}
        columns = {k: [self.prompt_columns[i].get(k) for i in prompt_indices for _ in range(cfg.group_size)] for k in names}
        total, each = score(self.reward_fns, self.reward_weights, prompts, answers, columns)
        scores = total.to(device)
        truncated = ~torch.isin(out.answer_ids, torch.tensor(self.stop_ids, device=device)).any(-1)  # [B]
        if cfg.missing_eos_penalty:
            scores = scores - cfg.missing_eos_penalty * truncated.float()
        batch = {"sequences": out.sequences, "attention_mask": out.attention_mask, "mask": mask}
        if self.needs_old_logps:
            batch["old_logps"] = self.token_logps(out.sequences, out.attention_mask, mask)
        kl = torch.zeros(len(prompts), device=device)
        if cfg.beta:
            batch["ref_logps"] = self.token_logps(out.sequences, out.attention_mask, mask, reference=True)
            old = batch["old_logps"] if self.needs_old_logps else self.token_logps(out.sequences, out.attention_mask, mask)
            kl = (kl_k1(old - batch["ref_logps"]) * mask).sum(-1)  # [B] sum over the answer's tokens
        shaped = scores - cfg.beta * kl if cfg.kl_in_reward else scores
        grouped = shaped.view(shard.prompts, cfg.group_size)  # a group's answers are all on this process
        if cfg.advantage == "rloo":
            advantages = leave_one_out_advantages(grouped)
        elif cfg.advantage == "batch_std":  # the std of every process's scores: what one process would divide by
            advantages = group_advantages(grouped, std=shard.gather(shaped).std())
        else:
            advantages = group_advantages(grouped, scale=cfg.advantage == "grpo")
        batch["advantages"] = advantages.reshape(-1)
        # the whole batch's statistics: every process's rows, in the one-process order
        g = shard.gather
        total, scores, kl, truncated = g(total.to(device)), g(scores), g(kl), g(truncated)
        by_group = scores.view(cfg.prompts_per_batch, cfg.group_size)
        group_std = by_group.std(-1)
        stats = {
            "reward": float(total.mean()),
            **{f"reward/{name}": float(g(v.to(device)).mean()) for name, v in each.items()},
            "reward_std_in_group": float(group_std.mean()),
            # all answers scored alike: no gradient (compared exactly: a float std of equal scores need not be 0)
            "groups_without_signal": float((by_group == by_group[:, :1]).all(-1).float().mean()),
            **({"kl": float(kl.mean())} if cfg.beta else {}),  # measured only where there is a reference
            "answer_len": float(g(out.answer_mask.sum(-1)).float().mean()),
            "truncated": float(truncated.float().mean()),
            "advantage_abs_mean": float(g(batch["advantages"]).abs().mean()),
        }
        # answer tokens of the whole rollout: dapo's divisor
        return {**batch, "stats": stats, "tokens": float(shard.sum(mask.sum().float()))}

    # -- updates -------------------------------------------------------------------------------
    def micro_loss(self, batch: dict, indices: list[int]):
        cfg = self.cfg
        mb = minibatch(batch, indices)
        ids, am, mask = mb["sequences"], mb["attention_mask"], mb["mask"]
        # [b, T], at the sampling temperature; in chunks of the LM head at a real vocabulary
        logps = self.opt.model((ids, am, mask, position_ids_from_mask(am), cfg.sampling.temperature))
        old = mb["old_logps"] if self.needs_old_logps else logps.detach()
        ref = mb.get("ref_logps")
        loss, metrics = group_policy_loss(
            logps, old, mb["advantages"], mask, cfg.clip_eps_low, cfg.clip_eps_high,
            ref_logps=ref, beta=0.0 if cfg.kl_in_reward else cfg.beta, loss_type=cfg.loss_type, unbiased_kl=cfg.unbiased_kl,
        )
        return loss, metrics

    def micro_size(self, batch: dict, indices: list[int]) -> float:
        """What a micro-batch's loss is a mean over: answers (grpo, sequence) or answer tokens (dapo)."""
        return float(batch["mask"][indices].sum()) if self.cfg.loss_type == "dapo" else float(len(indices))

    def step_divisor(self, tokens: float, answers: int) -> float | None:
        """dapo: the rollout batch's answer tokens, in the share of its answers this step holds. Every token of
        the rollout then weighs the same, whichever minibatch it falls in (DAPO's token mean over the batch,
        as TRL's num_items_in_batch / steps_per_generation); a minibatch's own token count would make each
        of its tokens weigh more the shorter its answers are. None: the step's own mean (grpo, sequence)."""
        if self.cfg.loss_type != "dapo":
            return None
        return tokens * answers / self.batch_size

    def update(self, batch: dict, tokens: float, part: list[int]) -> dict[str, float]:
        """One optimizer step on the rollout's rows `part` (global rows; each process trains on those it holds).
        A process that holds none of them still joins the step, with a weightless row, so that DDP's
        gradient all-reduce meets every process."""
        rows = self.shard.local(part)
        weight = 1.0 if rows else 0.0
        return self.opt.update(lambda idx: self.micro_loss(batch, idx), rows or [0],
                               lambda idx: weight * self.micro_size(batch, idx), self.step_divisor(tokens, len(part)))

    def train(self, stop_at: int | None = None) -> list[dict[str, float]]:
        """Run iterations up to cfg.iterations (or stop_at), resuming from the latest checkpoint."""
        cfg, shard = self.cfg, self.shard
        latest = self.checkpointer.latest()
        if latest is not None:
            self.iteration = self.checkpointer.load(self.opt, latest)["iteration"]
        self.ledger.resume(self.iteration)
        end = cfg.iterations if stop_at is None else min(stop_at, cfg.iterations)
        name = "rloo" if isinstance(cfg, RLOOConfig) else "grpo"
        history = []
        for _ in tqdm(range(self.iteration, end), desc=name, initial=self.iteration, total=cfg.iterations, leave=False, disable=None):
            prompts = self.prompt_sampler.global_batch(self.iteration)  # prompt ids, every process's
            self.ledger.record_prompts(self.iteration + 1, prompts, [shard.rank_of(k) for k in range(len(prompts))])
            batch = self.rollout(prompts)
            stats, tokens = batch.pop("stats"), batch.pop("tokens")
            self.opt.model.train()
            steps = []
            g = torch.Generator().manual_seed(stream_seed(cfg.seed, "minibatches", self.iteration))
            for _epoch in range(cfg.epochs):
                perm = torch.randperm(self.batch_size, generator=g).tolist()  # the rollout's global rows
                for i in range(0, self.batch_size, self.minibatch_size):
                    steps.append(self.update(batch, tokens, perm[i : i + self.minibatch_size]))
            metrics = {k: sum(m[k] for m in steps) / len(steps) for k in steps[0]}
            metrics["advantage_abs_mean"] = stats.pop("advantage_abs_mean")
            metrics.update(stats)
            self.iteration += 1
            history.append(metrics)
            if self.callback is not None:
                self.callback(self.iteration, metrics)
            if cfg.checkpoint_every and self.iteration % cfg.checkpoint_every == 0 and self.iteration < end:
                self.save_checkpoint()
        if history:
            self.save_checkpoint()
        return history

    def save_checkpoint(self) -> None:
        self.checkpointer.save(self.opt, {"iteration": self.iteration})

