"""Which rows each optimizer step, process and minibatch get: a deterministic sampler with exact resume,
the ledger of what each process trained on, the split of a rollout batch between processes, and the
minibatch cut of a rollout."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from typing import Callable, Sequence

import torch

from alignment.prefix import pack_rows

Tensor = torch.Tensor


def stream_seed(seed: int, stream: str, index: int = 0) -> int:
    """The generator seed of one random stream of an online-RL run: `stream` names what it draws (a rollout's
    tokens, its minibatch order) and `index` which one (the iteration). Two streams never share a generator,
    as they did with arithmetic: seed * 1000003 + i (tokens), seed * 7919 + i (minibatch order) and the prompt
    sampler's seed * 100003 + e were all i at seed 0, so iteration 0 drew its prompts, its answers' first tokens
    and its minibatch order from the same numbers. The same three give the same seed on every machine and
    process (a resumed run draws what the uninterrupted one drew). (StepSampler keeps its arithmetic seeds: the
    offline trainers' example order; they are small integers, which no hash here comes near.)"""
    digest = hashlib.blake2b(f"{stream}/{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def token_budget_split(lengths: Sequence[int], budget: int, what: str = "example") -> Callable[[list[int]], list[list[int]]]:
    """How a step's rows become micro-batches under a token budget (micro_batch_tokens): bins of at most `budget`
    tokens (lengths[i] is row i's), first fit, longest first (alignment.prefix.pack_rows), each bin one micro-batch
    that packs into one row of exactly `budget` tokens. Refuses a row longer than the budget, which no bin holds."""
    too_long = [i for i, n in enumerate(lengths) if n > budget]
    if too_long:
        i = max(too_long, key=lambda i: lengths[i])
        raise ValueError(f"{len(too_long)} {what}(s) are longer than micro_batch_tokens={budget} (the longest, {what} {i}, "
                         f"is {lengths[i]} tokens): raise micro_batch_tokens to at least {lengths[i]}, or lower max_length")

    def split(indices: list[int]) -> list[list[int]]:
        return [[indices[j] for j in members] for members in pack_rows([lengths[i] for i in indices], budget)]

    return split


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
