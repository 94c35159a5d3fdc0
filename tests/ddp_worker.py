"""Train a DPO policy or a reward model with the core trainers, as one process or under torchrun (DDP over
gloo on CPU): the worker of test_distributed.py.

    python tests/ddp_worker.py KIND MODEL PREFS.jsonl OUT STEPS BATCH
"""

import json
import sys
from pathlib import Path

from alignment.data import tokenize_pairs
from alignment.models import RewardModel, load_causal_lm, load_tokenizer
from alignment.trainers.common import TrainConfig, set_seed
from alignment.trainers.dpo import DPOConfig, DPOTrainer
from alignment.trainers.reward import RewardConfig, RewardTrainer


def main(kind: str, model: str, prefs: str, out: str, steps: int, batch: int) -> None:
    rows = [json.loads(line) for line in Path(prefs).read_text().splitlines()]
    tokenizer = load_tokenizer(model)
    examples = tokenize_pairs(tokenizer, [r["prompt"] for r in rows], [r["chosen"] for r in rows], [r["rejected"] for r in rows], 128)
    train = TrainConfig(max_steps=steps, batch_size=batch, lr=1e-3, warmup_steps=0)  # batch: the GLOBAL batch
    set_seed(0)
    if kind == "dpo":
        trainer = DPOTrainer(load_causal_lm(model), examples, tokenizer.pad_token_id, DPOConfig(train, max_length=128))
    else:
        trainer = RewardTrainer(RewardModel.from_pretrained(model), examples, tokenizer.pad_token_id, RewardConfig(train, max_length=128))
    history = trainer.train()
    accelerator = trainer.opt.accelerator
    if accelerator.is_main_process:
        out_dir = Path(out)
        out_dir.mkdir(parents=True, exist_ok=True)
        trainer.model.save_pretrained(out_dir / "model")
        (out_dir / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
        (out_dir / "processes").write_text(str(accelerator.num_processes))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    kind, model, prefs, out, steps, batch = sys.argv[1:]
    main(kind, model, prefs, out, int(steps), int(batch))
