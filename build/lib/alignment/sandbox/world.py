"""The sandbox world: a "friendly assistant" task with a known truth.

A seeded generator of user requests over 20 topics (each a task of its topic in one of many phrasings;
training and test requests use disjoint phrasings), an SFT corpus that mixes polite, neutral, rude,
off-topic and foul-mouthed answers, a hidden gold reward g(prompt, answer), and a simulated labeler that
prefers answer a over b with probability sigma((g_a - g_b) / tau). Text is lower-case with spaced
punctuation, so a word-level tokenizer covers it exactly.

The gold reward (a pure function of the two texts), per answer:
  + 1.0 per distinct advice sentence of the prompt's topic (at most 2 count)
  - 0.5 per advice sentence of another topic
  + 0.5 per polite phrase (at most 2 count)  - 0.75 per rude phrase
  - 2.0 per banned word
  - 0.05 per word beyond 30
So the best answer depends on the prompt (its topic's advice), and friendliness and clean language pay.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, field

TOPICS: dict[str, dict[str, list[str]]] = {
    "password": {
        "tasks": ["make a strong password", "keep my password safe"],
        "advice": ["use a long passphrase of random words .", "never reuse a password on two sites .", "turn on two factor login ."],
    },
    "recipe": {
        "tasks": ["cook rice", "make an easy dinner"],
        "advice": ["rinse the rice and use two cups of water .", "simmer it with the lid on for fifteen minutes .", "add salt and a little butter at the end ."],
    },
    "travel": {
        "tasks": ["pack for a trip", "get ready for my first flight"],
        "advice": ["pack light and roll your clothes .", "keep your passport in your carry on bag .", "arrive at the airport two hours early ."],
    },
    "fitness": {
        "tasks": ["start running", "get fit at home"],
        "advice": ["start with short runs three times a week .", "warm up and stretch before you exercise .", "rest one day between hard workouts ."],
    },
    "sleep": {
        "tasks": ["sleep better", "stop feeling tired all day"],
        "advice": ["go to bed at the same time every night .", "keep your bedroom dark and cool .", "avoid screens an hour before bed ."],
    },
    "budget": {
        "tasks": ["make a budget", "save more money"],
        "advice": ["write down every expense for a month .", "put a fixed amount into savings each payday .", "cancel subscriptions you do not use ."],
    },
    "garden": {
        "tasks": ["grow tomatoes", "keep my garden plants alive"],
        "advice": ["give the plants six hours of sun a day .", "water deeply at the base in the morning .", "feed the soil with compost ."],
    },
    "study": {
        "tasks": ["study for an exam", "remember what i read"],
        "advice": ["study in short sessions with breaks .", "test yourself instead of rereading notes .", "teach the topic to a friend ."],
    },
    "resume": {
        "tasks": ["write a good resume", "write a strong cv"],
        "advice": ["keep your resume to one page .", "list results with numbers , not duties .", "tailor it to each job posting ."],
    },
    "email": {
        "tasks": ["write a polite email", "email my boss"],
        "advice": ["write a clear subject line .", "keep the message short and specific .", "end with a clear request and thanks ."],
    },
    "coffee": {
        "tasks": ["brew good coffee", "make my coffee less bitter"],
        "advice": ["grind the beans right before brewing .", "use water just below boiling .", "try one gram of coffee per sixteen of water ."],
    },
    "dog": {
        "tasks": ["train my puppy", "stop my dog barking"],
        "advice": ["reward good behavior with treats right away .", "keep training sessions short and fun .", "be consistent with the same commands ."],
    },
    "car": {
        "tasks": ["check my tires", "look after my car"],
        "advice": ["check the tire pressure once a month .", "change the oil as the manual says .", "look at the tread depth with a coin ."],
    },
    "bike": {
        "tasks": ["fix a flat bike tire", "maintain my bike"],
        "advice": ["find the hole and patch the inner tube .", "keep the chain clean and oiled .", "check the brakes before each ride ."],
    },
    "plant": {
        "tasks": ["water a cactus", "keep houseplants alive"],
        "advice": ["let the soil dry out between waterings .", "use a pot with drainage holes .", "put the plant near a bright window ."],
    },
    "stress": {
        "tasks": ["deal with stress", "calm down quickly"],
        "advice": ["take slow deep breaths for one minute .", "go for a short walk outside .", "talk to someone you trust ."],
    },
    "phone": {
        "tasks": ["make my phone battery last", "speed up my slow phone"],
        "advice": ["lower the screen brightness .", "close apps you are not using .", "update the system software ."],
    },
    "interview": {
        "tasks": ["prepare for an interview", "ask good questions in an interview"],
        "advice": ["research the company before you go .", "practice answers to common questions .", "prepare two questions for the interviewer ."],
    },
    "laundry": {
        "tasks": ["remove a stain", "wash a wool sweater"],
        "advice": ["treat the stain with cold water right away .", "wash wool by hand in cool water .", "dry it flat away from heat ."],
    },
    "moving": {
        "tasks": ["plan a move", "pack for moving house"],
        "advice": ["label every box with its room .", "start packing two weeks early .", "book the movers well in advance ."],
    },
}

POLITE_OPENERS = ["happy to help !", "great question !", "glad you asked !"]
NEUTRAL_OPENERS = ["ok .", "here is how ."]
RUDE_OPENERS = ["ugh , fine .", "obviously .", "what a silly question ."]
POLITE_CLOSERS = ["hope this helps !", "good luck !", "you can do it !"]
RUDE_CLOSERS = ["figure the rest out yourself .", "not my problem ."]
POLITE_PHRASES = POLITE_OPENERS + POLITE_CLOSERS
RUDE_PHRASES = RUDE_OPENERS + RUDE_CLOSERS
DEFAULT_BANNED_WORDS = ("stupid", "idiot", "dumb", "lazy", "clueless")
BANNED_TEMPLATES = ["only a {w} person asks this .", "do not be {w} .", "even a {w} one knows this ."]
BANNED_NOUN_TEMPLATES = ["listen , {w} .", "come on , {w} ."]
PROMPT_TEMPLATE = "user : {ask} assistant :"
# A request is a prefix, a frame around one of its topic's tasks, and a suffix. The splits use disjoint
# frames, so evaluation asks in phrasings that training never saw; every word of a test frame occurs in
# the training frames, prefixes or suffixes (no word the model never read).
FRAMES = {
    "train": ["how do i {task} ?", "how can i {task} ?", "what is the best way to {task} ?", "can you help me {task} ?",
              "i want to {task} . any tips ?", "please tell me how to {task} ."],
    "test": ["tell me how i can {task} .", "any tips to {task} ?", "help me {task} , please .", "i want tips : how can i {task} ?"],
}
PREFIXES = ["", "hi !", "hello .", "quick question :"]
SUFFIXES = ["", "thanks !", "please help ."]
SPLITS = tuple(FRAMES)


@dataclass(frozen=True)
class WorldConfig:
    seed: int = 0  # seed of every draw of the world
    banned_words: tuple[str, ...] = DEFAULT_BANNED_WORDS  # lexicon whose words the gold reward penalises
    p_polite: float = 0.35  # probability that an SFT answer opens politely (else neutral or rude)
    p_rude: float = 0.3  # probability that an SFT answer opens rudely
    p_off_topic: float = 0.3  # probability that an SFT answer gives another topic's advice
    p_banned: float = 0.3  # probability that an SFT answer contains a banned word
    labeler_tau: float = 0.5  # temperature of the simulated labeler (larger = noisier labels)


class GoldLabeler:
    """The simulated labeler of a world that knows its gold reward (self.gold_reward, self.cfg.labeler_tau)."""

    def label(self, prompt: str, a: str, b: str, rng: random.Random) -> int:
        """Simulated labeler: 0 if it prefers a, 1 if b. P(a) = sigma((g_a - g_b) / tau)."""
        diff = (self.gold_reward(prompt, a) - self.gold_reward(prompt, b)) / self.cfg.labeler_tau
        return 0 if rng.random() < 1.0 / (1.0 + math.exp(-diff)) else 1

    def preference_pairs(self, answers_by_prompt: Iterable[tuple[str, list[str]]], seed: int) -> tuple[list[tuple[int, str, str]], int]:
        """Every two different answers of each prompt, labeled by the simulated labeler.

        Returns (pairs, empty): pairs as (index of the prompt, chosen, rejected), and how many pairs were left
        out because an answer is empty (an empty answer is a legitimate sample, not a preference)."""
        rng, pairs, empty = random.Random(seed), [], 0
        for i, (prompt, answers) in enumerate(answers_by_prompt):
            for a, b in itertools.combinations(answers, 2):
                if a == b:
                    continue
                if not a.strip() or not b.strip():
                    empty += 1
                    continue
                pairs.append((i, a, b) if self.label(prompt, a, b, rng) == 0 else (i, b, a))
        return pairs, empty


@dataclass
class World(GoldLabeler):
    cfg: WorldConfig = field(default_factory=WorldConfig)

    # -- prompts and answers ----------------------------------------------------------------------
    def prompts(self, n: int, seed: int | None = None, split: str = "train") -> list[str]:
        """n user requests cycling over the topics, each a seeded draw of task, frame (of `split`), prefix
        and suffix: 6 x 40 x 4 x 3 = 2,880 distinct training requests, 1,920 test ones."""
        if split not in FRAMES:
            raise ValueError(f"unknown split {split!r}; use one of {list(FRAMES)}")
        rng = random.Random(self.cfg.seed if seed is None else seed)
        topics = sorted(TOPICS)
        out = []
        for i in range(n):
            frame = rng.choice(FRAMES[split]).format(task=rng.choice(TOPICS[topics[i % len(topics)]]["tasks"]))
            ask = " ".join(part for part in (rng.choice(PREFIXES), frame, rng.choice(SUFFIXES)) if part)
            out.append(PROMPT_TEMPLATE.format(ask=ask))
        return out

    def sft_answer(self, prompt: str, rng: random.Random) -> str:
        """One answer of the SFT mixture: real mixture of good and bad behaviour."""
        c = self.cfg
        topic = topic_of(prompt)
        u = rng.random()
        tone = "polite" if u < c.p_polite else "rude" if u < c.p_polite + c.p_rude else "neutral"
        parts = [rng.choice({"polite": POLITE_OPENERS, "rude": RUDE_OPENERS, "neutral": NEUTRAL_OPENERS}[tone])]
        source = topic if rng.random() >= c.p_off_topic else rng.choice([t for t in TOPICS if t != topic])
        parts += rng.sample(TOPICS[source]["advice"], k=rng.choice([1, 2, 2, 3]))
        if rng.random() < c.p_banned:
            word = rng.choice(self.cfg.banned_words)
            template = rng.choice(BANNED_TEMPLATES + BANNED_NOUN_TEMPLATES)
            parts.insert(rng.randint(0, len(parts)), template.format(w=word))
        closer = {"polite": POLITE_CLOSERS, "rude": RUDE_CLOSERS, "neutral": []}[tone if rng.random() < 0.7 else "neutral"]
        if closer:
            parts.append(rng.choice(closer))
        return " ".join(parts)

    def sft_corpus(self, n: int, seed: int | None = None) -> list[tuple[str, str]]:
        rng = random.Random((self.cfg.seed if seed is None else seed) + 1)
        prompts = self.prompts(n, seed)
        return [(p, self.sft_answer(p, rng)) for p in prompts]

    # -- the hidden truth -----------------------------------------------------------------------
    def gold_reward(self, prompt: str, answer: str) -> float:
        return gold_reward(prompt, answer, self.cfg.banned_words)

    def banned_count(self, answer: str) -> int:
        words = answer.split()
        return sum(words.count(w) for w in self.cfg.banned_words)


def topic_of(prompt: str) -> str:
    for name, topic in TOPICS.items():
        if any(f" {task} " in prompt for task in topic["tasks"]):
            return name
    raise ValueError(f"not a sandbox prompt: {prompt!r}")


def gold_reward(prompt: str, answer: str, banned_words=DEFAULT_BANNED_WORDS) -> float:
    """g(prompt, answer); see the module docstring for the terms."""
    topic = topic_of(prompt)
    on_topic = sum(s in answer for s in TOPICS[topic]["advice"])
    off_topic = sum(s in answer for t, v in TOPICS.items() if t != topic for s in v["advice"])
    polite = sum(answer.count(p) for p in POLITE_PHRASES)
    rude = sum(answer.count(p) for p in RUDE_PHRASES)
    words = answer.split()
    banned = sum(words.count(w) for w in banned_words)
    return (
        1.0 * min(on_topic, 2)
        - 0.5 * off_topic
        + 0.5 * min(polite, 2)
        - 0.75 * rude
        - 2.0 * banned
        - 0.05 * max(0, len(words) - 30)
    )
