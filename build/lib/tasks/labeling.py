"""Human preference labels: a transactional SQLite store of labeling items and judgements.

Every judgement is committed the moment it is given, and (item, annotator) is unique, so a crash, a
closed tab or a double key press neither loses nor duplicates a judgement; labeling resumes at the
first item the annotator has not judged. The order in which the two answers are shown is randomised
per (item, annotator) and stored with the judgement.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import secrets
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

CHOICES = {"1": "left", "2": "right", "t": "tie", "s": "skip"}

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY, batch TEXT NOT NULL, prompt TEXT NOT NULL,
    answer_a TEXT NOT NULL, answer_b TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS judgements (
    item_id TEXT NOT NULL REFERENCES items(id), annotator TEXT NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN ('a', 'b', 'tie', 'skip')),
    left_answer TEXT NOT NULL CHECK (left_answer IN ('a', 'b')), created REAL NOT NULL,
    PRIMARY KEY (item_id, annotator));
CREATE TABLE IF NOT EXISTS invitations (
    token_sha256 TEXT PRIMARY KEY, annotator TEXT NOT NULL, created REAL NOT NULL);
"""


class LabelStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.connect() as con:
            con.execute("PRAGMA journal_mode=WAL")
            con.executescript(SCHEMA)
            if "messages" not in {row["name"] for row in con.execute("PRAGMA table_info(items)")}:  # a store from before
                con.execute("ALTER TABLE items ADD COLUMN messages TEXT NOT NULL DEFAULT ''")

    @contextmanager
    def connect(self):
        con = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        con.row_factory = sqlite3.Row
        try:
            yield con
        finally:
            con.close()

    # -- items ------------------------------------------------------------------------------------
    def add_batch(self, samples: pd.DataFrame, batch: str, pairs_per_prompt: int | None = 1, seed: int = 0) -> int:
        """Items from every prompt's distinct answers: `pairs_per_prompt` pairs of two of them (drawn at random,
        the same draw for the same seed and prompt), or every pair when None. Returns how many new items were
        added. Eight answers to a prompt make 28 pairs: a team labels one or two of them, not all."""
        if pairs_per_prompt is not None and pairs_per_prompt < 1:
            raise ValueError(f"pairs_per_prompt must be at least 1 (or None for every pair), not {pairs_per_prompt}")
        rows = []
        for prompt, group in samples.groupby("prompt", sort=False):
            answers = list(dict.fromkeys(group["answer"]))
            messages = str(group["messages"].iloc[0]) if "messages" in group else ""  # a conversation, shown as turns
            pairs = list(itertools.combinations(answers, 2))
            if pairs_per_prompt is not None and len(pairs) > pairs_per_prompt:
                rng = random.Random(hashlib.sha256(f"{seed}\0{prompt}".encode()).hexdigest())
                pairs = rng.sample(pairs, pairs_per_prompt)
            for a, b in pairs:
                item_id = hashlib.sha256("\0".join((prompt, a, b)).encode()).hexdigest()[:16]
                rows.append((item_id, batch, prompt, a, b, time.time(), messages))
        with self.connect() as con:
            before = con.execute("SELECT COUNT(*) FROM items").fetchone()[0]
            con.execute("BEGIN")
            con.executemany("INSERT OR IGNORE INTO items (id, batch, prompt, answer_a, answer_b, created, messages) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            con.execute("COMMIT")
            return con.execute("SELECT COUNT(*) FROM items").fetchone()[0] - before

    @staticmethod
    def left_answer(item_id: str, annotator: str) -> str:
        """Which answer is shown on the left: random, but the same for the same item and annotator."""
        return random.Random(f"{item_id}/{annotator}").choice("ab")

    def next_item(self, annotator: str) -> dict | None:
        """The first item this annotator has not judged, with its display order; None when done."""
        with self.connect() as con:
            row = con.execute(
                "SELECT * FROM items WHERE id NOT IN (SELECT item_id FROM judgements WHERE annotator = ?) "
                "ORDER BY created, id LIMIT 1", (annotator,)).fetchone()
        if row is None:
            return None
        left = self.left_answer(row["id"], annotator)
        a, b = row["answer_a"], row["answer_b"]
        return {"id": row["id"], "prompt": row["prompt"], "messages": json.loads(row["messages"]) if row["messages"] else None,
                "left": left,
                "left_text": a if left == "a" else b, "right_text": b if left == "a" else a}

    def record(self, item_id: str, annotator: str, key: str) -> bool:
        """Store a judgement given by key 1 / 2 / t / s. Returns False if it was already stored."""
        if key not in CHOICES:
            raise LabelError(f"The key {key!r} is not a judgement: use 1 (left is better), 2 (right), t (tie) or s (skip).")
        if not annotator.strip():
            raise LabelError("An annotator id is required: open the page as /?annotator=YOUR_NAME.")
        left = self.left_answer(item_id, annotator)
        choice = {"left": left, "right": "b" if left == "a" else "a"}.get(CHOICES[key], CHOICES[key])
        with self.connect() as con:
            if con.execute("SELECT 1 FROM items WHERE id = ?", (item_id,)).fetchone() is None:
                raise LabelError(f"There is no labeling item {item_id}: reload the page for the next one.")
            cur = con.execute("INSERT OR IGNORE INTO judgements VALUES (?, ?, ?, ?, ?)",
                              (item_id, annotator, choice, left, time.time()))
            return cur.rowcount == 1

    # -- access -----------------------------------------------------------------------------------
    def invite(self, annotator: str) -> str:
        """A new access token for `annotator` (only its hash is stored). A page reached through it judges
        as that annotator, whatever id the request claims."""
        if not annotator.strip():
            raise LabelError("An annotator id is required to invite someone.")
        token = secrets.token_urlsafe(18)
        with self.connect() as con:
            con.execute("INSERT INTO invitations VALUES (?, ?, ?)", (_sha256(token), annotator.strip(), time.time()))
        return token

    def annotator_for(self, token: str) -> str | None:
        """The annotator a token was issued to, or None for an unknown token."""
        with self.connect() as con:
            row = con.execute("SELECT annotator FROM invitations WHERE token_sha256 = ?", (_sha256(token),)).fetchone()
        return row["annotator"] if row else None

    def has_invitations(self) -> bool:
        with self.connect() as con:
            return con.execute("SELECT 1 FROM invitations LIMIT 1").fetchone() is not None

    # -- reading ----------------------------------------------------------------------------------
    def progress(self, annotator: str) -> dict[str, int]:
        with self.connect() as con:
            total = con.execute("SELECT COUNT(*) FROM items").fetchone()[0]
            done = con.execute("SELECT COUNT(*) FROM judgements WHERE annotator = ?", (annotator,)).fetchone()[0]
        return {"done": done, "total": total}

    def judgements(self, batch: str | None = None) -> pd.DataFrame:
        where, args = ("WHERE i.batch = ?", (batch,)) if batch else ("", ())
        with self.connect() as con:
            return pd.read_sql_query(
                "SELECT j.*, i.prompt, i.answer_a, i.answer_b FROM judgements j JOIN items i ON i.id = j.item_id "
                f"{where} ORDER BY j.created", con, params=args)

    def fingerprint(self, batch: str | None = None) -> str:
        """Changes whenever a judgement is added: part of the label stage's cache key."""
        df = self.judgements(batch)
        return hashlib.sha256(df[["item_id", "annotator", "choice"]].to_csv(index=False).encode()).hexdigest()

    def agreement(self) -> dict[str, float]:
        """Pairs judged (not skipped) by two or more annotators: the raw agreement (the fraction of annotator
        pairs on an item that agree) and Fleiss' kappa (agreement beyond what the annotators' overall choice
        rates would give by chance; 1 = perfect, 0 = chance, below 0 = worse than chance)."""
        df = self.judgements()
        df = df[df["choice"] != "skip"]
        rated = [group["choice"].tolist() for _, group in df.groupby("item_id") if len(group) >= 2]
        agree = total = 0
        for choices in rated:
            for x, y in itertools.combinations(choices, 2):
                total += 1
                agree += x == y
        return {"items_with_2plus": len(rated), "agreement": agree / total if total else float("nan"),
                "fleiss_kappa": fleiss_kappa(rated)}

    def export(self, batch: str | None = None) -> pd.DataFrame:
        """Standard pairs (prompt, chosen, rejected) by majority vote; ties, skips and split votes dropped."""
        df = self.judgements(batch)
        out = []
        for item_id, group in df[df["choice"].isin(["a", "b"])].groupby("item_id", sort=False):
            votes = group["choice"].value_counts()
            if len(votes) > 1 and votes.iloc[0] == votes.iloc[1]:
                continue
            first = group.iloc[0]
            win = votes.index[0]
            chosen, rejected = (first["answer_a"], first["answer_b"]) if win == "a" else (first["answer_b"], first["answer_a"])
            out.append({"prompt": first["prompt"], "chosen": chosen, "rejected": rejected,
                        "annotators": ",".join(sorted(group["annotator"]))})
        return pd.DataFrame(out, columns=["prompt", "chosen", "rejected", "annotators"])


class LabelError(ValueError):
    """A judgement the store refuses; the message is a sentence for the person at the page."""


def fleiss_kappa(rated: list[list[str]]) -> float:
    """Fleiss' kappa over items rated by two or more annotators each (rated: the choices given to each item;
    the number of raters may differ between items). P_i = (sum_j n_ij^2 - n_i) / (n_i (n_i - 1)) is the
    agreement on item i, P = mean_i P_i, p_j = share of all ratings in category j, P_e = sum_j p_j^2, and
    kappa = (P - P_e) / (1 - P_e). NaN without items, or when every rating is the same category (P_e = 1)."""
    rated = [r for r in rated if len(r) >= 2]
    if not rated:
        return float("nan")
    per_item = []
    totals: dict[str, int] = {}
    for choices in rated:
        counts: dict[str, int] = {}
        for c in choices:
            counts[c] = counts.get(c, 0) + 1
            totals[c] = totals.get(c, 0) + 1
        n = len(choices)
        per_item.append((sum(k * k for k in counts.values()) - n) / (n * (n - 1)))
    n_ratings = sum(totals.values())
    p_bar = sum(per_item) / len(per_item)
    p_e = sum((k / n_ratings) ** 2 for k in totals.values())
    return float("nan") if p_e == 1 else (p_bar - p_e) / (1 - p_e)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
