"""SFT demonstrations in the layouts users have: Alpaca, ShareGPT conversations, TRL messages,
prompt/completion; and the SFT loss covers the answer tokens only."""

import json

import pytest
import torch

from tasks.schemas import DataError
from tasks.stages.sft import Params, import_demonstrations

USER = {"role": "user", "content": "How do I cook rice?"}


def read(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text(json.dumps(rows) if name.endswith(".json") else "".join(json.dumps(r) + "\n" for r in rows))
    df, _ = import_demonstrations(Params(data=str(path)))
    return [(json.loads(m) if m else p, c) for p, m, c in zip(df["prompt"], df["messages"], df["completion"])]


def test_every_layout(tmp_path):
    alpaca = [{"instruction": "Summarise the text.", "input": "Rice is a grain.", "output": "A grain.", "system": "Be brief."},
              {"instruction": "How do I cook rice?", "input": "", "output": "Rinse it."}]
    assert read(tmp_path, "alpaca.json", alpaca) == [
        ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Summarise the text.\n\nRice is a grain."}], "A grain."),
        ([USER], "Rinse it.")]
    sharegpt = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
                                   {"from": "human", "value": "How do I cook rice?"}, {"from": "gpt", "value": "Rinse it."}]}]
    hi = {"role": "user", "content": "Hi"}
    assert read(tmp_path, "sharegpt.jsonl", sharegpt) == [  # every assistant turn is learned, in its context
        ([hi], "Hello!"), ([hi, {"role": "assistant", "content": "Hello!"}, USER], "Rinse it.")]
    messages = [{"messages": [USER, {"role": "assistant", "content": "Rinse it."}]}]
    assert read(tmp_path, "messages.jsonl", messages) == [([USER], "Rinse it.")]
    pc = [{"prompt": "How do I cook rice?", "completion": "Rinse it."},
          {"prompt": [USER], "completion": [{"role": "assistant", "content": "Rinse it."}]}]
    assert read(tmp_path, "pc.jsonl", pc) == [("How do I cook rice?", "Rinse it."), ([USER], "Rinse it.")]


def test_bad_demonstrations_are_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": [USER, {"role": "assistant", "content": "ok"}]}) + "\n"
                    + json.dumps({"messages": [{"role": "assistant", "content": "ok"}, USER]}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:line 2: column 'messages': must end with the assistant's answer"):
        import_demonstrations(Params(data=str(path)))


def test_sft_loss_counts_answer_tokens_only(tiny_lm):
    """The loss is the mean -log p of the answer tokens (EOS included), computed by hand from the logits."""
    from alignment.trainers.common import TrainConfig
    from alignment.trainers.sft import SFTConfig, SFTTrainer

    cfg = SFTConfig(TrainConfig(max_steps=1, batch_size=1))
    loss = lambda prompt, answer: float(SFTTrainer(tiny_lm, [(prompt, answer)], 0, cfg).micro_loss([0])[0])  # noqa: E731
    base = loss([1, 5, 6, 7], [8, 9, 2])
    with torch.no_grad():  # by hand: mean -log p over the 3 answer tokens, read off the logits
        ids = torch.tensor([[1, 5, 6, 7, 8, 9, 2]])
        logps = torch.log_softmax(tiny_lm(ids).logits[0, :-1], -1)
        by_hand = -sum(float(logps[t - 1, ids[0, t]]) for t in (4, 5, 6)) / 3
    assert base == pytest.approx(by_hand, rel=1e-5)


def test_sharegpt_tool_calls_and_observations_are_demonstrations_with_their_tools(tmp_path):
    """LLaMA-Factory's ShareGPT tool layout: a function_call turn (JSON text) is an assistant tool call, an
    observation is a tool message, and the tools column (JSON text) is the conversation's tool definitions;
    each assistant turn, the call and the final answer, is a demonstration."""
    import json

    tools = [{"name": "weather", "description": "today's weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    row = {"conversations": [{"from": "human", "value": "Weather in Paris?"},
                             {"from": "function_call", "value": json.dumps({"name": "weather", "arguments": {"city": "Paris"}})},
                             {"from": "observation", "value": "sunny, 21 C"},
                             {"from": "gpt", "value": "It is sunny in Paris."}],
           "tools": json.dumps(tools)}
    path = tmp_path / "tools.json"
    path.write_text(json.dumps([row]))
    df, rejects = import_demonstrations(Params(data=str(path)))
    assert len(df) == 2 and len(rejects) == 0
    call, answer = df.to_dict("records")
    assert json.loads(call["messages"]) == [{"role": "tools", "content": "", "tools": tools},
                                            {"role": "user", "content": "Weather in Paris?"}]
    assert json.loads(call["completion_message"])["tool_calls"] == [
        {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]
    assert call["completion"] == '[calls weather({"city": "Paris"})]'
    assert [m["role"] for m in json.loads(answer["messages"])] == ["tools", "user", "assistant", "tool"]
    assert json.loads(answer["messages"])[3]["content"] == "sunny, 21 C"
    assert answer["completion"] == "It is sunny in Paris." and answer["completion_message"] == ""
