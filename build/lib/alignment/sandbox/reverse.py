"""A sandbox task with a verifiable reward: reverse a sequence of letters.

"user : reverse : c a t assistant :" is answered "t a c". The truth is known exactly, so the reward is a
check, not a model: exact_match(prompts, answers) -> 1.0 or 0.0 (a reward function for the grpo and rloo
stages: `reward_functions: ["alignment.sandbox.reverse:exact_match"]`).

The SFT demonstrations are a careless teacher's: most of them make the same slip (the first two letters
of the answer swapped), so the SFT model mostly answers wrongly, in a way that only checking can tell
apart; the right answer is among its samples, which is what RL with a verifier needs. Requests of the test split
are letter sequences that no training request holds (disjoint content).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from alignment.sandbox.world import PROMPT_TEMPLATE, GoldLabeler

LETTERS = "abcdefghij"
ASK = "reverse : {letters}"


@dataclass(frozen=True)
class ReverseConfig:
    seed: int = 0  # seed of every draw of the task
    letters: str = LETTERS  # the alphabet of the sequences
    demo_lengths: tuple[int, ...] = (2, 3, 4)  # lengths of the SFT demonstrations' sequences
    rl_lengths: tuple[int, ...] = (2, 3, 4)  # lengths of the training prompts (RL needs no answers)
    test_lengths: tuple[int, ...] = (3, 4)  # lengths of the held-out prompts (their letters: unseen sequences)
    p_careless: float = 0.7  # share of demonstrations with the first two letters of the answer swapped
    labeler_tau: float = 0.5  # temperature of the simulated labeler (for preference stages)


def letters_of(prompt: str) -> list[str]:
    """The sequence a reverse request asks about."""
    if "reverse :" not in prompt:
        raise ValueError(f"not a reverse request: {prompt!r}")
    return prompt.split("reverse :", 1)[1].replace("assistant :", " ").split()


def exact_match(prompts, answers) -> list[float]:
    """1.0 where the answer is the request's letters reversed (whitespace ignored), else 0.0."""
    return [float(a.split() == letters_of(p)[::-1]) for p, a in zip(prompts, answers)]


def _in_split(seq: tuple[str, ...], split: str) -> bool:
    """Every sequence belongs to one split, by a hash of its letters (stable across runs and machines)."""
    h = sum((i + 1) * (ord(c) - 96) for i, c in enumerate(seq)) * 2654435761 % 2**32
    return (h % 5 == 0) == (split == "test")


@dataclass
class ReverseWorld(GoldLabeler):
    cfg: ReverseConfig = field(default_factory=ReverseConfig)

    def prompts(self, n: int, seed: int | None = None, split: str = "train", lengths: tuple[int, ...] | None = None) -> list[str]:
        """n requests of the split: sequences of distinct letters with lengths cycling over the split's lengths."""
        if split not in ("train", "test"):
            raise ValueError(f"unknown split {split!r}; use train or test")
        rng = random.Random(self.cfg.seed if seed is None else seed)
        lengths = lengths or (self.cfg.rl_lengths if split == "train" else self.cfg.test_lengths)
        out = []
        while len(out) < n:
            seq = tuple(rng.sample(self.cfg.letters, lengths[len(out) % len(lengths)]))
            if _in_split(seq, split):
                out.append(PROMPT_TEMPLATE.format(ask=ASK.format(letters=" ".join(seq))))
        return out

    def sft_answer(self, prompt: str, rng: random.Random) -> str:
        answer = letters_of(prompt)[::-1]
        if rng.random() < self.cfg.p_careless:
            answer[0], answer[1] = answer[1], answer[0]
        return " ".join(answer)

    def sft_corpus(self, n: int, seed: int | None = None) -> list[tuple[str, str]]:
        rng = random.Random((self.cfg.seed if seed is None else seed) + 1)
        prompts = self.prompts(n, seed, lengths=self.cfg.demo_lengths)
        return [(p, self.sft_answer(p, rng)) for p in prompts]

    def texts(self) -> list[str]:
        """Every word the task uses, for the tokenizer."""
        return [PROMPT_TEMPLATE.format(ask=ASK.format(letters=" ".join(self.cfg.letters)))]

    # -- the truth --------------------------------------------------------------------------------
    def gold_reward(self, prompt: str, answer: str) -> float:
        return exact_match([prompt], [answer])[0]
