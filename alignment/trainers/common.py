"""What every trainer shares: optimisation (accelerate, accumulation, clipping, LR schedule, a NaN/inf
guard), checkpoints with exact resume, a deterministic sampler, and the metrics callback.

Trainers compose these pieces; none of them holds loss math.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from alignment.config import TrainConfig  # noqa: F401 - re-exported
from alignment.trainers.accelerator import ACCELERATOR_LOCK, StageAccelerator

Tensor = torch.Tensor
MetricsCallback = Callable[[int, dict[str, float]], None]
"""Called as callback(step, metrics) after every optimizer step; the library itself logs nowhere."""


class NonFiniteLossError(RuntimeError):
    """Raised when a loss or gradient norm is NaN/inf; the last good checkpoint is kept as it was."""


DIVERGED = "the last checkpoint is kept. Lower the learning rate (or warm up for longer), and look for broken examples"


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Multiplier of the peak LR at a given step: linear warm-up, then constant/linear/cosine decay."""

    def fn(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        progress = min(progress, 1.0)
        if cfg.lr_schedule == "linear":
            return 1.0 - progress
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        raise ValueError(f"unknown lr_schedule {cfg.lr_schedule!r}: use constant, linear or cosine")

    return fn


class StepSampler:
    """Deterministic example order: epoch e is a permutation seeded by (seed, e).

    batch(step) depends only on (seed, step), so a resumed run sees exactly the batches it would
    have seen. Under several processes each takes its own slice of the global batch.
    With `lengths`, the examples of GROUP consecutive batches are sorted by length, cut into GROUP
    batches again and those are taken in a seeded random order (as transformers' LengthGroupedSampler):
    each batch holds examples of similar length, so little of it is padding, and an epoch still visits
    every example once.
    """

    GROUP = 8

    def __init__(self, n_examples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 lengths: list[int] | None = None):
        if n_examples <= 0:
            raise ValueError("the training set is empty")
        if lengths is not None and len(lengths) != n_examples:
            raise ValueError(f"{len(lengths)} lengths for {n_examples} examples")
        self.n, self.batch_size, self.seed = n_examples, batch_size, seed
        self.rank, self.world_size, self.lengths = rank, world_size, lengths
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g).tolist()}
        return self._perms[epoch]

    def _positions(self, start: int, count: int) -> list[int]:
        return [self._perm(p // self.n)[p % self.n] for p in range(start, start + count)]

    def global_batch(self, step: int) -> list[int]:
        """Example indices of global batch `step`, every process's share."""
        if self.lengths is None:
            return self._positions(step * self.batch_size, self.batch_size)
        group = step // self.GROUP
        members = self._positions(group * self.GROUP * self.batch_size, self.GROUP * self.batch_size)
        members.sort(key=lambda i: self.lengths[i])
        g = torch.Generator().manual_seed(self.seed * 7_919 + group)
        k = int(torch.randperm(self.GROUP, generator=g)[step % self.GROUP])
        return members[k * self.batch_size : (k + 1) * self.batch_size]

    def batch(self, step: int) -> list[int]:
        """Example indices of global batch `step` that belong to this process."""
        return self.global_batch(step)[self.rank :: self.world_size]


class Ledger:
    """Which examples (or prompts) each optimizer step or iteration consumed: `ledger.jsonl` in the output
    folder, one line {"step": s, "ids": [...]} a step, written by the main process. A resumed run first
    cuts the file back to its checkpoint's step, so after any number of kills the ledger equals an
    uninterrupted run's: nothing skipped, nothing seen twice."""

    FILE = "ledger.jsonl"

    def __init__(self, path: Path | None, main_process: bool = True):
        self.path = path if main_process else None

    @classmethod
    def under(cls, output_dir: str | Path | None, main_process: bool = True) -> "Ledger":
        return cls(Path(output_dir) / cls.FILE if output_dir else None, main_process)

    def resume(self, step: int) -> None:
        """Keep the steps up to `step` (those the checkpoint holds); 0 starts a fresh ledger."""
        if self.path is None or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def record(self, step: int, ids: list[int]) -> None:
        self._write([{"step": step, "ids": [int(i) for i in ids]}])

    def record_prompts(self, step: int, ids: list[int], ranks: list[int]) -> None:
        """Online RL: one line a prompt of iteration `step`, {"step", "id", "rank"}: which process sampled it."""
        self._write([{"step": step, "id": int(i), "rank": int(r)} for i, r in zip(ids, ranks)])

    def _write(self, rows: list[dict]) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as fh:
                fh.write("".join(json.dumps(row) + "\n" for row in rows))


class RolloutShard:
    """This process's share of an online-RL rollout batch of `prompts` prompts x `answers` answers each.

    Under N processes each takes a contiguous block of prompts_per_batch / N whole prompts (a prompt's
    answers never straddle processes, so group statistics stay local) and their rows: global rows
    first_row .. first_row + rows - 1, prompt-major. Everything that spans the batch (advantage whitening,
    the KL controller, token counts, logged metrics) goes through `gather` / `sum`, so N processes compute
    what one does. In one process the shard is the whole batch and nothing is communicated.
    """

    def __init__(self, accelerator, prompts: int, answers: int = 1):
        self.accelerator, self.world, rank = accelerator, accelerator.num_processes, accelerator.process_index
        if prompts % self.world:
            raise ValueError(f"{prompts} prompts a batch do not split evenly over {self.world} processes: "
                             f"use a multiple of {self.world}")
        self.prompts = prompts // self.world  # this process's prompts a batch
        self.first_prompt = rank * self.prompts
        self.rows, self.total_rows = self.prompts * answers, prompts * answers
        self.first_row = rank * self.rows

    def mine(self, global_prompts: list) -> list:
        """This process's block of the batch's prompts (global order)."""
        return global_prompts[self.first_prompt : self.first_prompt + self.prompts]

    def rank_of(self, position: int) -> int:
        """The process that handles the batch's `position`-th prompt."""
        return position // self.prompts

    def local(self, rows: list[int]) -> list[int]:
        """The global rows of `rows` this process holds, as its own row indices, in the given order."""
        return [r - self.first_row for r in rows if self.first_row <= r < self.first_row + self.rows]

    def gather(self, t: Tensor) -> Tensor:
        """[rows, ...] of every process, in global row order (contiguous blocks, rank order)."""
        return self.accelerator.gather(t.contiguous()) if self.world > 1 else t

    def sum(self, t: Tensor) -> Tensor:
        """Summed over processes."""
        return self.accelerator.reduce(t.clone(), reduction="sum") if self.world > 1 else t


def minibatch(batch: dict[str, Tensor], indices: list[int]) -> dict[str, Tensor]:
    """The rows `indices` of a rollout batch, cut to the columns any of them uses.

    A rollout is as wide as its longest prompt plus its longest answer; a minibatch of shorter rows would
    spend most of its forward and backward passes on padding. Columns where no chosen row has a real token
    (attention_mask 0) are dropped at both ends. Every [B, T] tensor is cut alike and [B] tensors are only
    indexed, so per-token losses are unchanged: padding is masked out, and positions come from the mask.
    """
    am = batch["attention_mask"][indices]  # [b, T]
    used = am.any(0).nonzero().squeeze(-1)  # columns holding a real token of some row
    start, end = int(used[0]), int(used[-1]) + 1
    width = am.shape[1]
    return {k: v[indices][:, start:end] if v.dim() == 2 and v.shape[1] == width else v[indices] for k, v in batch.items()}


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Turn on activation checkpointing in every transformers model inside `model` (policy, value model,
    reward backbone); use_reentrant=False so frozen embeddings (LoRA) still pass gradients on."""
    found = False
    for module in model.modules():
        if hasattr(module, "gradient_checkpointing_enable") and getattr(module, "supports_gradient_checkpointing", False):
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            found = True
    if not found:
        raise ValueError(f"{type(model).__name__} holds no transformers model that supports gradient checkpointing")


def compile_backbones(model: torch.nn.Module) -> None:
    """torch.compile (dynamic shapes) every transformers backbone inside `model`, in place, so state_dict
    keys and saving are unchanged and every caller of the backbone (policy, reward head, shared-prefix
    batches) runs the compiled graph."""
    from transformers import PreTrainedModel

    backbones = [m for m in model.modules() if isinstance(m, PreTrainedModel) and m.base_model is m]
    if not backbones:
        raise ValueError(f"{type(model).__name__} holds no transformers backbone to compile")
    for backbone in backbones:
        backbone.compile(dynamic=True)


class Optimization:
    """AdamW + LR schedule + accelerate (devices, DDP, mixed precision) + clipping + NaN/inf guard."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig):
        self.cfg = cfg
        # several processes on a machine without CUDA (torchrun on CPU): DDP over gloo
        cpu_ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        if cfg.compile:
            compile_backbones(model)
        params = [p for p in model.parameters() if p.requires_grad]
        with ACCELERATOR_LOCK:  # until the model is prepared: its forward's autocast is read off the shared setting
            self.accelerator = StageAccelerator(cfg.mixed_precision, cpu=cpu_ddp)
            if cfg.batch_size < self.accelerator.num_processes:
                raise ValueError(f"batch_size {cfg.batch_size} is smaller than the {self.accelerator.num_processes} "
                                 "processes: every process needs at least one example a step")
            # one fused kernel for the whole update on a GPU (what transformers' Trainer uses there: adamw_torch_fused)
            fused = self.accelerator.device.type == "cuda"
            optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
            self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        # not prepared: accelerate would step a prepared scheduler once per process; registered, so that
        # save_state / load_state carry it
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.accelerator.register_for_checkpointing(self.scheduler)
        self.step = 0

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def sampler(self, n_examples: int, lengths: list[int] | None = None) -> StepSampler:
        """The data order of this run: cfg.batch_size examples a step, this process's share of them;
        grouped by `lengths` (tokens per example) when cfg.group_by_length."""
        return StepSampler(n_examples, self.cfg.batch_size, self.cfg.seed, self.accelerator.process_index,
                           self.accelerator.num_processes, lengths if self.cfg.group_by_length else None)

    def split(self, indices: list[int]) -> list[list[int]]:
        """Split a batch into grad_accum_steps micro-batches."""
        k = self.cfg.grad_accum_steps
        size = math.ceil(len(indices) / k)
        return [indices[i : i + size] for i in range(0, len(indices), size)]

    def update(self, micro_losses: Callable[[list[int]], tuple[Tensor, dict]], indices: list[int],
               size: Callable[[list[int]], float] = len, total: float | None = None) -> dict[str, float]:
        """One optimizer step over `indices`: accumulate, clip, step, schedule. Returns mean metrics.

        `size(part)` is what a micro-batch's loss is a mean over: its examples by default, its answer
        tokens for a per-token loss, its pairs for prompt groups. Each micro-batch's loss is weighted by
        its share of the batch's size, so accumulation gives the gradient of the whole batch's mean.
        `total` replaces the batch's own size as the divisor, over all processes (GRPO's token mean over a
        rollout batch of which this step is one minibatch: its answer tokens / its minibatches)."""
        micro = self.split(indices)
        sizes = [float(size(part)) for part in micro]
        given, total, scale = total, sum(sizes), 1.0
        if self.accelerator.num_processes > 1:
            # Processes may hold different amounts (prompt groups with more or fewer pairs): weigh by the
            # global total, and undo DDP's plain average over processes, so the gradient is the mean over
            # the whole global batch, as in one process.
            total = float(self.accelerator.reduce(torch.tensor([total], device=self.device), reduction="sum")[0])
            scale = float(self.accelerator.num_processes)
        total = total or 1.0
        divisor = given or total  # of the loss; the metrics stay means over this batch
        totals: dict[str, float] = {}
        for i, part in enumerate(micro):
            # under DDP, gradients are all-reduced once, after the last micro-batch
            sync = contextlib.nullcontext() if i == len(micro) - 1 else self.accelerator.no_sync(self.model)
            with sync:
                with self.accelerator.autocast():
                    loss, metrics = micro_losses(part)
                if not torch.isfinite(loss.detach()):
                    raise NonFiniteLossError(f"the loss is {loss.item()} at step {self.step}, so training stopped before "
                                             f"that update; {DIVERGED}")
                self.accelerator.backward(loss * sizes[i] * scale / divisor)
            metrics = {"loss": loss.detach(), **metrics}
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + float(value) * sizes[i] / total
        grad_norm = self.accelerator.clip_grad_norm_(
            self.model.parameters(), self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        )
        if grad_norm is None:  # DeepSpeed clips inside its own step and reports no norm here
            grad_norm = float("nan")
        elif not torch.isfinite(torch.as_tensor(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(f"the gradient norm is {float(grad_norm)} at step {self.step}, so training stopped "
                                     f"before that update; {DIVERGED}")
        if self.accelerator.num_processes > 1:  # each process holds its share of the global mean: add them up
            keys = sorted(totals)
            summed = self.accelerator.reduce(torch.tensor([totals[k] for k in keys], device=self.device), reduction="sum")
            totals = dict(zip(keys, summed.tolist()))
        totals["grad_norm"] = float(grad_norm)
        totals["lr"] = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return totals

@contextlib.contextmanager
def _quiet(logger: str):
    """Warnings of one library logger held back (for a message that is expected where we call it)."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


class Checkpointer:
    """Resumable checkpoints under `directory/checkpoint-<step>/`, through accelerate's save_state: the
    model, optimizer, LR scheduler and every process's RNG states, written by the processes that own them
    (the main process for DDP, every rank its shard for FSDP's sharded state), plus `trainer_state.json`
    (the step and what a trainer adds, e.g. PPO's KL coefficient).

    Every process calls save and load. The state is written to a temporary folder that the main process
    renames once all are done, so a crash never leaves a half checkpoint; older checkpoints are removed only
    after a newer one is complete. A model with NaN/inf parameters is never saved.
    """

    STATE = "trainer_state.json"

    def __init__(self, directory: str | Path | None):
        self.directory = Path(directory) if directory else None

    @classmethod
    def under(cls, output_dir: str | Path | None) -> "Checkpointer":
        """Checkpoints in `<output_dir>/checkpoints`; none when output_dir is None."""
        return cls(Path(output_dir) / "checkpoints" if output_dir else None)

    def latest(self) -> Path | None:
        if self.directory is None or not self.directory.is_dir():
            return None
        done = [p for p in self.directory.glob("checkpoint-*") if (p / self.STATE).is_file()]
        return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)

    def save(self, opt: "Optimization", extra: dict[str, Any] | None = None) -> Path | None:
        if self.directory is None:
            return None
        acc, step = opt.accelerator, opt.step
        bad = [n for n, p in opt.model.named_parameters() if p.is_floating_point() and not torch.isfinite(p.detach()).all()]
        if acc.num_processes > 1:  # every process must agree, or the others would wait for it forever
            bad_anywhere = acc.reduce(torch.tensor([float(len(bad))], device=opt.device), reduction="sum")[0]
            bad = bad or (["(on another process)"] if bad_anywhere > 0 else [])
        if bad:
            raise NonFiniteLossError(f"parameters {bad[:3]} are NaN/inf at step {step}; the last good checkpoint is kept")
        final, tmp = self.directory / f"checkpoint-{step}", self.directory / f".tmp-checkpoint-{step}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        with _quiet("accelerate.utils.other"):  # "Removed shared tensor {'lm_head.weight'}": tied embeddings, as expected
            acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            (tmp / self.STATE).write_text(json.dumps({"step": step, **(extra or {})}))  # last: marks it complete
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in self.directory.glob("checkpoint-*"):
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def load(self, opt: "Optimization", path: Path) -> dict[str, Any]:
        """Restore model, optimizer, scheduler, RNG and step; returns trainer_state.json."""
        opt.accelerator.load_state(str(path))
        state = json.loads((path / self.STATE).read_text())
        opt.step = state["step"]
        return state


def train_steps(
    opt: Optimization,
    sampler: StepSampler,
    micro_losses: Callable[[list[int]], tuple[Tensor, dict]],
    checkpointer: Checkpointer,
    callback: MetricsCallback | None = None,
    stop_at: int | None = None,
    desc: str = "train",
    size: Callable[[list[int]], float] = len,
) -> list[dict[str, float]]:
    """The supervised loop of SFT, reward-model and DPO training, resumable from the latest checkpoint.

    Runs optimizer steps opt.step .. cfg.max_steps - 1 (or until stop_at), calling callback(step, metrics)
    after each and saving a checkpoint every cfg.checkpoint_every steps and at the end.
    Returns the metrics of the steps run in this call.
    """
    cfg = opt.cfg
    latest = checkpointer.latest()
    if latest is not None:
        checkpointer.load(opt, latest)
    ledger = Ledger.under(checkpointer.directory.parent if checkpointer.directory else None, opt.accelerator.is_main_process)
    ledger.resume(opt.step)
    end = cfg.max_steps if stop_at is None else min(stop_at, cfg.max_steps)
    history = []
    for _ in tqdm(range(opt.step, end), desc=desc, initial=opt.step, total=cfg.max_steps, leave=False, disable=None):
        ledger.record(opt.step + 1, sampler.global_batch(opt.step))
        metrics = opt.update(micro_losses, sampler.batch(opt.step), size)
        history.append(metrics)
        if callback is not None:
            callback(opt.step, metrics)
        if cfg.checkpoint_every and opt.step % cfg.checkpoint_every == 0 and opt.step < end:
            checkpointer.save(opt)
    if checkpointer.directory is not None and history:
        checkpointer.save(opt)
    return history
