"""What every trainer shares: optimisation (accelerate, accumulation, clipping, LR schedule, a NaN/inf
guard), checkpoints with exact resume, the training loop, and the metrics callback (which rows a step gets:
alignment.trainers.rows).

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
from alignment.trainers.rows import Ledger, StepSampler, token_budget_split

Tensor = torch.Tensor
log = logging.getLogger(__name__)
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


def compile_backbones(model: torch.nn.Module, dynamic: bool = True) -> None:
    """torch.compile every transformers backbone inside `model`, in place, so state_dict keys and saving are
    unchanged and every caller of the backbone (policy, reward head, shared-prefix batches) runs the compiled
    graph. dynamic: shapes vary from batch to batch; False where every micro-batch has the same shape (a token
    budget), so the graph is specialised to it."""
    from transformers import PreTrainedModel

    backbones = [m for m in model.modules() if isinstance(m, PreTrainedModel) and m.base_model is m]
    if not backbones:
        raise ValueError(f"{type(model).__name__} holds no transformers backbone to compile")
    for backbone in backbones:
        backbone.compile(dynamic=dynamic)


class Optimization:
    """AdamW + LR schedule + accelerate (devices, DDP, mixed precision) + clipping + NaN/inf guard."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, micro_batch_tokens: int = 0):
        """micro_batch_tokens: a token budget (see split); every micro-batch then has the same shape, so cfg.compile
        specialises to it."""
        self.cfg, self.micro_batch_tokens = cfg, micro_batch_tokens
        # several processes on a machine without CUDA (torchrun on CPU): DDP over gloo
        cpu_ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        if cfg.compile:
            compile_backbones(model, dynamic=not micro_batch_tokens)
        params = [p for p in model.parameters() if p.requires_grad]
        with ACCELERATOR_LOCK:  # until the model is prepared: its forward's autocast is read off the shared setting
            self.accelerator = StageAccelerator(cfg.mixed_precision, cpu=cpu_ddp)
            if cfg.batch_size < self.accelerator.num_processes:
                raise ValueError(f"batch_size {cfg.batch_size} is smaller than the {self.accelerator.num_processes} "
                                 "processes: every process needs at least one example a step")
            # one fused kernel for the whole update (transformers' Trainer's default, adamw_torch_fused, on a GPU and a
            # CPU alike); the for-loop where torch has no fused kernel for the device
            fused = self.accelerator.device.type in ("cuda", "cpu")
            optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
            self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        # not prepared: accelerate would step a prepared scheduler once per process; registered, so that
        # save_state / load_state carry it
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.accelerator.register_for_checkpointing(self.scheduler)
        self.step = 0
        self.micro_cap: int | None = None  # examples a micro-batch at most, once one ran out of accelerator memory
        self.token_split: Callable[[list[int]], list[list[int]]] | None = None  # under a token budget (sampler)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def sampler(self, n_examples: int, lengths: list[int] | None = None, what: str = "example") -> StepSampler:
        """The data order of this run: cfg.batch_size examples a step, this process's share of them;
        grouped by `lengths` (tokens per example) when cfg.group_by_length. Under a token budget the lengths also
        cut each step into micro-batches (token_budget_split, which refuses a `what` longer than the budget)."""
        if self.micro_batch_tokens:
            self.token_split = token_budget_split(lengths, self.micro_batch_tokens, what)
        return StepSampler(n_examples, self.cfg.batch_size, self.cfg.seed, self.accelerator.process_index,
                           self.accelerator.num_processes, lengths if self.cfg.group_by_length else None)

    def split(self, indices: list[int]) -> list[list[int]]:
        """Split a batch into micro-batches: bins of at most micro_batch_tokens tokens under a token budget, else
        grad_accum_steps of them (more, of at most micro_cap examples, once one ran out of accelerator memory)."""
        if self.token_split is not None:
            return self.token_split(indices)
        k = self.cfg.grad_accum_steps
        size = math.ceil(len(indices) / k)
        size = min(size, self.micro_cap or size)
        return [indices[i : i + size] for i in range(0, len(indices), size)]

    def update(self, micro_losses: Callable[[list[int]], tuple[Tensor, dict]], indices: list[int],
               size: Callable[[list[int]], float] = len, total: float | None = None) -> dict[str, float]:
        """One optimizer step over `indices` (see accumulate). Where a micro-batch runs out of accelerator memory
        (one process, micro-batches cut by count), the step starts again from zero gradients with micro-batches
        of half the size, and later steps keep that size: the same gradient (micro-batches are weighed by what
        their losses average), from less memory at once. Under several processes an out-of-memory error stops
        the stage (the others would wait for it in the gradient's all-reduce), as it does under a token budget
        (lower micro_batch_tokens)."""
        while True:
            try:
                return self.accumulate(micro_losses, indices, size, total)
            except torch.OutOfMemoryError:
                largest = max(len(part) for part in self.split(indices))
                if self.token_split is not None or self.accelerator.num_processes > 1 or largest == 1:
                    raise
            self.optimizer.zero_grad(set_to_none=True)  # what the micro-batches before it added
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.micro_cap = largest // 2
            log.warning("a micro-batch of %d examples ran out of memory at step %d: %d at a time from now on, "
                        "the same gradient", largest, self.step, self.micro_cap)

    def accumulate(self, micro_losses: Callable[[list[int]], tuple[Tensor, dict]], indices: list[int],
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
