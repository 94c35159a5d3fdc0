"""Under torchrun (gloo): shard a tiny Llama with torch's FSDP2 (`fully_shard`), train two steps, and save
it with the stages' `save_model`: rank 0 writes the full model, gathered from the shards. The worker of
test_distributed.py; argv: OUT."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
from tokenizers import Tokenizer, models

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_llama_config  # noqa: E402

from tasks.stage import save_model  # noqa: E402

dist.init_process_group("gloo")
torch.manual_seed(0)
model = LlamaForCausalLM(tiny_llama_config())
for layer in model.model.layers:
    fully_shard(layer)
fully_shard(model)
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
ids = torch.tensor([[1, 5, 6, 7, 8, 2]] * 2)
for _ in range(2):
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
shard = next(p for p in model.parameters() if type(p).__name__ == "DTensor")
assert shard.to_local().numel() < shard.numel()  # really sharded over the two ranks
out = Path(sys.argv[1])
tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")))
save_model(model, tokenizer, out / f"rank{dist.get_rank()}")
logits = model(input_ids=ids).logits.detach()
if dist.get_rank() == 0:
    torch.save(logits, out / "logits.pt")
dist.barrier()  # both ranks done before either tears its connections down
dist.destroy_process_group()
