"""PPO for language models (Ziegler et al. 2019; Ouyang et al. 2022).

One iteration: sample answers for a batch of prompts (all at once, KV cache) -> score them with the
reward function -> per-token rewards r_t = -beta * kl_t, plus the score at the last answer token ->
GAE -> several epochs of minibatch updates of clipped policy loss + c_v * value loss - c_e * entropy.
"""

from __future__ import annotations

import dataclasses

from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from alignment.config import PPOConfig  # noqa: F401 - re-exported
from alignment.advantages import AdaptiveKLController, FixedKLController, explained_variance, gae, whiten
from alignment.data import encode_prompt, pad
from alignment.logprobs import answer_logprobs
from alignment.lora import has_adapters, reference_mode
from alignment.losses import kl_penalty, masked_mean, ppo_policy_loss, value_loss
from alignment.models import PolicyWithValueHead, frozen_copy, position_ids_from_mask
from alignment.sampling import sample_within_memory, stop_token_ids
from alignment.trainers.common import Checkpointer, MetricsCallback, Optimization
from alignment.trainers.rows import Ledger, RolloutShard, StepSampler, minibatch, stream_seed

RewardFn = Callable[[list[str], list[str]], torch.Tensor]
"""reward_fn(prompts, answers) -> scores [B]; text in, so the reward model may use its own tokenizer."""


class PPOTrainer:
    def __init__(
        self,
        model: PolicyWithValueHead,
        tokenizer,
        prompts: Sequence[str],
        reward_fn: RewardFn,
        cfg: PPOConfig,
        ref_model=None,
        output_dir: str | Path | None = None,
        callback: MetricsCallback | None = None,
    ):
        self.cfg, self.tokenizer, self.prompts, self.reward_fn, self.callback = cfg, tokenizer, list(prompts), reward_fn, callback
        if ref_model is None and not has_adapters(model.policy):
            ref_model = frozen_copy(model.policy)
        self.ref_model = ref_model  # None: the policy with its LoRA adapters disabled
        self.opt = Optimization(model, cfg.train_config())
        if self.ref_model is not None:
            self.ref_model.to(self.opt.device)
        self.prompt_sampler = StepSampler(len(self.prompts), cfg.rollout_batch_size, cfg.seed)
        self.shard = RolloutShard(self.opt.accelerator, cfg.rollout_batch_size)  # this process's prompts of a rollout
        self.kl_ctl = (
            AdaptiveKLController(cfg.beta, cfg.target_kl, cfg.kl_horizon) if cfg.target_kl else FixedKLController(cfg.beta)
        )
        self.checkpointer = Checkpointer.under(output_dir)
        self.ledger = Ledger.under(output_dir, self.opt.accelerator.is_main_process)
        self.iteration = 0
        self.stop_ids = stop_token_ids(cfg.sampling, tokenizer, model.policy)  # EOS, the template's end of turn, ...

    @property
    def model(self) -> PolicyWithValueHead:
        return self.opt.accelerator.unwrap_model(self.opt.model)

    # -- rollouts ------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, batch_prompts: list[str]) -> dict[str, torch.Tensor]:
        """Sample, score, and compute per-token rewards, advantages and returns for this process's share of
        a batch of prompts (every process's, in order). Tensors are this process's rows; whitening uses the
        whole batch's statistics."""
        cfg, device, pad_id, shard = self.cfg, self.opt.device, self.tokenizer.pad_token_id, self.shard
        model = self.model.eval()
        prompts = shard.mine(batch_prompts)
        encoded = [encode_prompt(self.tokenizer, p) for p in batch_prompts]  # padded as the whole batch would be
        prompt_ids, prompt_mask = pad(shard.mine(encoded), pad_id, side="left", width=max(map(len, encoded)))
        params = dataclasses.replace(cfg.sampling, stop_token_ids=self.stop_ids)
        out = sample_within_memory(model.policy, prompt_ids.to(device), prompt_mask.to(device), params, pad_id,
                                   stream_seed(cfg.seed, "rollout", self.iteration), rows=(shard.first_row, shard.total_rows))
        sequences, attention_mask = out.sequences, out.attention_mask  # [B, P + N]
        mask = torch.zeros_like(attention_mask)  # [B, P + N], 1 on answer tokens
        mask[:, out.prompt_length :] = out.answer_mask

        tau = cfg.sampling.temperature  # ratios and KL in the distribution the answers were sampled from
        rows = cfg.minibatch_size  # scored a minibatch's rows at a time, as the update reads them: bounded activations
        parts = [(sequences[i : i + rows], attention_mask[i : i + rows], mask[i : i + rows]) for i in range(0, len(sequences), rows)]
        scored = [model(*part, tau)[:2] for part in parts]
        logps, values = torch.cat([s[0] for s in scored]), torch.cat([s[1] for s in scored])  # [B, P + N] each
        ref_logps = torch.cat([self.reference_logps(*part) for part in parts])

        answers = self.tokenizer.batch_decode(
            [ids[m.bool()].tolist() for ids, m in zip(out.answer_ids, out.answer_mask)], skip_special_tokens=True
        )
        scores = self.reward_fn(prompts, answers).to(device).float()  # [B]
        truncated = ~torch.isin(out.answer_ids, torch.tensor(self.stop_ids, device=device)).any(-1)  # [B]
        shaped = scores - cfg.missing_eos_penalty * truncated.float() if cfg.missing_eos_penalty else scores

        kl = kl_penalty(logps, ref_logps, cfg.kl_estimator) * mask  # [B, P + N]
        rewards = -self.kl_ctl.value * kl
        last = out.prompt_length + out.answer_mask.sum(-1) - 1  # [B] index of the last answer token
        rewards[torch.arange(len(prompts), device=device), last] += shaped
        advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = whiten(advantages, mask, total=shard.sum)
        return {
            "sequences": sequences, "attention_mask": attention_mask, "mask": mask,
            "logps": logps, "values": values * mask, "advantages": advantages, "returns": returns,
            "scores": scores, "kl": kl.sum(-1), "answer_len": out.answer_mask.sum(-1).float(),
            "truncated": truncated.float(),
        }

    @torch.no_grad()
    def reference_logps(self, sequences: torch.Tensor, attention_mask: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-token log-probs [B, T] of the answer tokens under the reference policy (the frozen model, or the
        policy with adapters off), at the sampling temperature."""
        args = (sequences, attention_mask, mask, position_ids_from_mask(attention_mask), self.cfg.sampling.temperature)
        if self.ref_model is not None:
            return answer_logprobs(self.ref_model, *args)
        with reference_mode(self.model.policy) as policy:
            return answer_logprobs(policy, *args)

    # -- updates -------------------------------------------------------------------------------
    def micro_loss(self, batch: dict[str, torch.Tensor], indices: list[int]):
        cfg = self.cfg
        mb = minibatch(batch, indices)
        logps, values, entropies = self.opt.model(mb["sequences"], mb["attention_mask"], mb["mask"],
                                                  cfg.sampling.temperature, entropy=True)  # [b, T] each
        pg_loss, metrics = ppo_policy_loss(logps, mb["logps"], mb["advantages"], mb["mask"], cfg.clip_eps)
        vf_loss = value_loss(values, mb["values"], mb["returns"], mb["mask"], cfg.value_clip_eps)
        entropy = masked_mean(entropies, mb["mask"])  # of the distributions that predicted the answer tokens
        loss = pg_loss + cfg.vf_coef * vf_loss
        if cfg.ent_coef:  # at 0 (the default) the entropy is only logged: no backward through its softmax
            loss = loss - cfg.ent_coef * entropy
        return loss, {"policy_loss": pg_loss.detach(), "value_loss": vf_loss.detach(), "entropy": entropy.detach(), **metrics}

    def micro_size(self, batch: dict[str, torch.Tensor], indices: list[int]) -> float:
        """The loss is a token mean over a micro-batch, which weighs as its share of the minibatch's answer tokens:
        a process's part of the minibatch under several processes, a part of it where the minibatch ran out of
        memory and goes in smaller micro-batches (Optimization.update)."""
        return float(batch["mask"][indices].sum())

    def update(self, batch: dict[str, torch.Tensor], part: list[int]) -> dict[str, float]:
        """One optimizer step on the rollout's rows `part` (global rows; each process trains on those it holds,
        and one that holds none joins the step with a weightless row, for DDP's all-reduce)."""
        rows = self.shard.local(part)
        weight = 1.0 if rows else 0.0
        return self.opt.update(lambda idx: self.micro_loss(batch, idx), rows or [0],
                               lambda idx: weight * self.micro_size(batch, idx))

    def train(self, stop_at: int | None = None) -> list[dict[str, float]]:
        """Run iterations up to cfg.iterations (or stop_at), resuming from the latest checkpoint."""
        cfg, shard = self.cfg, self.shard
        latest = self.checkpointer.latest()
        if latest is not None:
            state = self.checkpointer.load(self.opt, latest)
            self.iteration, self.kl_ctl.value = state["iteration"], state["beta"]
        self.ledger.resume(self.iteration)
        end = cfg.iterations if stop_at is None else min(stop_at, cfg.iterations)
        history = []
        for _ in tqdm(range(self.iteration, end), desc="ppo", initial=self.iteration, total=cfg.iterations, leave=False, disable=None):
            ids = self.prompt_sampler.global_batch(self.iteration)  # prompt ids, every process's
            self.ledger.record_prompts(self.iteration + 1, ids, [shard.rank_of(k) for k in range(len(ids))])
            batch = self.rollout([self.prompts[i] for i in ids])
            self.opt.model.train()
            step_metrics = []
            g = torch.Generator().manual_seed(stream_seed(cfg.seed, "minibatches", self.iteration))
            for _epoch in range(cfg.ppo_epochs):
                perm = torch.randperm(shard.total_rows, generator=g).tolist()  # the rollout's global rows
                for i in range(0, len(perm), cfg.minibatch_size):
                    step_metrics.append(self.update(batch, perm[i : i + cfg.minibatch_size]))
            metrics = {k: sum(m[k] for m in step_metrics) / len(step_metrics) for k in step_metrics[0]}
            kl = shard.gather(batch["kl"])  # the whole batch's
            mean_kl = float(kl.mean())
            mask = batch["mask"]
            m = mask.to(batch["advantages"].dtype)
            metrics.update({
                "reward": float(shard.gather(batch["scores"]).mean()),
                "kl": mean_kl,
                "beta": self.kl_ctl.value,
                "answer_len": float(shard.gather(batch["answer_len"]).mean()),
                "truncated": float(shard.gather(batch["truncated"]).mean()),
                "value_explained_variance": float(explained_variance(batch["values"], batch["returns"], mask, shard.sum)),
                "advantage_mean": float(shard.sum((batch["advantages"] * m).sum()) / shard.sum(m.sum()).clamp(min=1.0)),
            })
            self.kl_ctl.update(mean_kl, len(kl))
            self.iteration += 1
            history.append(metrics)
            if self.callback is not None:
                self.callback(self.iteration, metrics)
            if cfg.checkpoint_every and self.iteration % cfg.checkpoint_every == 0:
                self.save_checkpoint()
        if history:
            self.save_checkpoint()
        return history

    def save_checkpoint(self) -> None:
        self.checkpointer.save(self.opt, {"iteration": self.iteration, "beta": self.kl_ctl.value})
