"""Every file of ../shared/realworld/ through `alignflow run`, with the outcome a user expects: it trains
(tokenizers, templates, preference, demonstration and prompt files), or it exits 2 with a sentence that
names the file or row and what to do, never a traceback or an exception repr."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from told import told as refused
from realworld import bare_gpt2_folder, gpt2_tokenizer, real, real_tokenizer, tiny_llama

pytestmark = pytest.mark.usefixtures("prefect_server")  # runs flows: the session's Prefect server (conftest.py)

CLI = str(Path(sys.executable).parent / "alignflow")
TINY_TRAIN = {"max_steps": 2, "batch_size": 4, "lr": 1e-3, "warmup_steps": 0}


def run(root: Path, name: str, stages: list[dict]) -> tuple[subprocess.CompletedProcess, dict[str, dict]]:
    """`alignflow run` of a one-pipeline file in root; (the result, each computed stage's metrics)."""
    cfg = {"settings": {"seed": 0, "workdir": str(root / f"runs-{name}"), "tracking_uri": f"sqlite:///{root / 'mlflow.db'}"},
           "pipelines": {name: {"stages": stages}}}
    (root / f"{name}.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True))
    result = subprocess.run([CLI, "run", name, "-c", str(root / f"{name}.yaml")], cwd=root, capture_output=True, text=True,
                            timeout=900, env={**os.environ, "TQDM_DISABLE": "1"})
    metrics = {}
    for success in (root / f"runs-{name}").glob("stages/*/*/_SUCCESS.json"):
        record = json.loads(success.read_text())
        if "stage" in record:
            metrics[record["stage"]] = json.loads((success.parent / "metrics.json").read_text())
    return result, metrics


def output_of(root: Path, pipeline: str, stage: str) -> Path:
    [success] = [s for s in (root / f"runs-{pipeline}").glob("stages/*/*/_SUCCESS.json") if json.loads(s.read_text()).get("stage") == stage]
    return success.parent


def trained(result: subprocess.CompletedProcess) -> str:
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    return out


def model(name: str, folder: Path, **params) -> dict:
    return {"name": name, "type": "model", "params": {"name_or_path": str(folder), **params}}


def prefs(name: str, relative: str, **params) -> dict:
    return {"name": name, "type": "import_preferences", "params": {"path": real(relative), **params}}


def dpo(name: str, policy: str, preferences: str, **dpo_params) -> dict:
    return {"name": name, "type": "dpo", "inputs": {"policy": policy, "preferences": preferences},
            "params": {"dpo": {"max_length": 192, "beta": 0.1, "train": TINY_TRAIN, **dpo_params}}}


def sft(name: str, policy: str, relative: str, max_length: int = 192, **params) -> dict:
    return {"name": name, "type": "sft", "inputs": {"policy": policy},
            "params": {"data": real(relative), "sft": {"max_length": max_length, "train": TINY_TRAIN}, **params}}


def test_real_preference_files_train_dpo_on_real_tokenizers(tmp_path):
    """Anthropic HH (re-split, one pair with chosen == rejected, dropped), LLaMA-Factory's ShareGPT DPO in
    Chinese (system turns, a duplicate), its v1 layout (content as parts) and turbo-alignment's pairs (role
    'bot', other column names) go to DPO on minimind's and GPT-2's real tokenizers; GPT-2's has no chat
    template and no pad token. One DPO computes its reference on the fly (precompute_ref_logps: false), one packs
    its pairs under a token budget (micro_batch_tokens). OpenAI
    tool-calling conversations (tool_calls without content, a tools list) train SFT through minimind's template,
    which renders tools= and the calls: the loss covers the call as the template writes it."""
    minimind = tiny_llama(tmp_path / "minimind", real_tokenizer("minimind"))
    gpt2 = tiny_llama(tmp_path / "gpt2", gpt2_tokenizer())
    result, m = run(tmp_path, "prefs", [
        model("minimind", minimind), model("gpt2", gpt2),
        prefs("hh", "preferences/hh-derived-split/test_prefs.jsonl", drop_invalid=True),
        prefs("zh", "preferences/dpo_zh_demo.json"),
        prefs("v1", "preferences/v1_dpo_demo.jsonl", held_out=0.2),
        prefs("turbo", "preferences/turbo-alignment-fixtures/train_preferences.jsonl", held_out=0.0,
              columns={"context": "prompt", "answer_w": "chosen", "answer_l": "rejected"}),
        dpo("dpo_hh", "gpt2", "hh", precompute_ref_logps=False),
        dpo("dpo_zh", "minimind", "zh"), dpo("dpo_turbo", "minimind", "turbo"),
        dpo("dpo_v1", "minimind", "v1", packing=True, micro_batch_tokens=384),  # a token budget: 2 x max_length
        sft("tools", "minimind", "sft/stock_toolcall_validation.jsonl", max_length=1024),
        {"name": "evaluate", "type": "evaluate", "inputs": {"policy": "dpo_zh", "reference": "minimind", "preferences": "zh"},
         "params": {"prompts": 4, "max_length": 192, "sampling": {"max_new_tokens": 8}}},
    ])
    trained(result)
    assert m["hh"]["rows_read"] == 300 and m["hh"]["rows_invalid"] == 1 and m["hh"]["rows_kept"] == 299  # row 224
    assert m["zh"]["rows_read"] == 100 and m["zh"]["rows_duplicate"] == 1
    assert m["v1"]["rows_kept"] == 10 and m["turbo"]["rows_kept"] == 1 and m["turbo"]["rows_duplicate"] == 15
    for stage in ("dpo_hh", "dpo_zh", "dpo_v1", "dpo_turbo"):
        assert m[stage]["final_loss"] > 0, (stage, m[stage])
    assert "eval/implicit_accuracy" in m["evaluate"]
    zh = json.loads((output_of(tmp_path, "prefs", "dpo_zh") / "first_sequence.json").read_text())["text"]
    assert "<|im_start|>assistant\n" in zh, zh[-300:]  # minimind's ChatML template (the answer is cut at 192 tokens)
    assert m["tools"]["demonstrations"] == 10
    call = json.loads((output_of(tmp_path, "prefs", "tools") / "first_sequence.json").read_text())
    assert "# Tools" in call["text"] and '"name": "get_current_stock_price"' in call["text"]  # the tools, in the prompt
    learned = real_tokenizer("minimind").decode(call["ids"][call["answer_start"]:])
    assert learned.startswith('<tool_call>\n{"name": "get_last_nday_stock_price", "arguments": {"symbol": "GS"'), learned
    hh = json.loads((output_of(tmp_path, "prefs", "dpo_hh") / "first_sequence.json").read_text())["text"]
    assert "<|im_start|>" not in hh and "Human: " in hh  # a text prompt, read as it is written


def test_real_demonstration_and_prompt_files_train_sft_and_grpo_on_phi3(tmp_path):
    """Alpaca (axolotl's, LLaMA-Factory's, identity.json's {{name}} placeholders), ShareGPT (FastChat's,
    axolotl's one-object file), OpenAI chat (a row without a user turn, a 26 KB answer), LLaMA-Factory v1
    (content parts, loss_weight) go to SFT on Phi-3's real tokenizer; MT-Bench's prompts (`turns`) to sampling and to GRPO with a reward function that reads
    the file's `reference` column, and that evaluation reports too."""
    phi3 = tiny_llama(tmp_path / "phi3", real_tokenizer("phi-3-mini"))
    (tmp_path / "ref_reward.py").write_text(
        "def has_reference(prompts, answers, reference=None):\n"
        "    assert reference is not None and len(reference) == len(answers)\n"
        "    return [float(r is not None) for r in reference]\n")
    mt_bench = real("prompts/mt_bench/question.jsonl")
    result, m = run(tmp_path, "demos", [
        model("phi3", phi3),
        sft("alpaca", "phi3", "sft/alpaca/alpaca.json"), sft("alpaca_en", "phi3", "sft/alpaca_en_demo.json"),
        sft("identity", "phi3", "sft/identity.json"), sft("one_object", "phi3", "sft/conversation.json"),
        sft("fastchat", "phi3", "sft/dummy_conversation.json"), sft("openai_chat", "phi3", "sft/toy_chat_fine_tuning.jsonl"),
        sft("v1", "phi3", "sft/v1_sft_demo.jsonl"),
        {"name": "sample", "type": "sample", "inputs": {"policy": "v1"},
         "params": {"prompts_file": mt_bench, "prompts": 4, "samples_per_prompt": 1, "sampling": {"max_new_tokens": 4}}},
        {"name": "grpo", "type": "grpo", "inputs": {"policy": "v1"},
         "params": {"prompts_file": mt_bench, "prompts": 80, "reward_functions": ["ref_reward.py:has_reference"],
                    "grpo": {"iterations": 1, "prompts_per_batch": 4, "group_size": 2, "sampling": {"max_new_tokens": 4}}}},
        {"name": "evaluate", "type": "evaluate", "inputs": {"policy": "grpo", "reference": "v1"},
         "params": {"prompts_file": mt_bench, "prompts": 80, "reward_functions": ["ref_reward.py:has_reference"],
                    "sampling": {"max_new_tokens": 4}}},
    ])
    trained(result)
    assert m["alpaca"]["demonstrations"] == 2 and m["identity"]["demonstrations"] == 91
    assert m["one_object"]["demonstrations"] >= 1 and m["fastchat"]["demonstrations"] > 300  # one per assistant turn
    assert m["sample"]["samples"] == 4
    assert m["evaluate"]["eval/reward/has_reference"] == pytest.approx(39 / 80)  # 39 of MT-Bench's 80 have one
    # the trained models declare Phi-3's end of turn (<|end|>, 32007) beside EOS (<|endoftext|>, 32000), which
    # the starting folder does not: transformers' generate and vLLM stop the saved model where its turn ends
    from transformers import GenerationConfig

    assert GenerationConfig.from_pretrained(phi3).eos_token_id == 32000
    for stage in ("v1", "grpo"):
        assert GenerationConfig.from_pretrained(output_of(tmp_path, "demos", stage) / "model").eos_token_id == [32000, 32007]


def test_real_chat_templates_render_or_fold_their_system_turn(tmp_path):
    """Gemma's template (raises on a system turn) trains DPO on system-prompted pairs with the system text
    folded into the first user turn, said once; Llama-3, Mistral v1, Phi-3 and ChatML from axolotl train SFT
    on OpenAI's chat file, which has system turns; an older Phi-3 template that drops the system turn trains
    with a warning that names the role; Gemma's template kept strict (system_turns: error) with drop_invalid
    trains on the rows without a system turn and lists the others."""
    minimind = "minimind"
    models = {"gemma": real_tokenizer(minimind, "gemma/tokenizer_config.json")}
    for name in ("llama3", "mistral_v1", "phi_3", "chatml"):
        models[name] = real_tokenizer(minimind, f"templates/axolotl/{name}.jinja")
    dropping = next(t["template"] for t in json.loads(Path(real("tokenizers/templates/ollama_template_index.json")).read_text())
                    if t["name"] == "phi-3" and "system" not in t["template"])
    models["phi3_old"] = real_tokenizer(minimind)
    models["phi3_old"].chat_template = dropping
    stages = [model(name, tiny_llama(tmp_path / name, tok)) for name, tok in models.items()]
    stages += [prefs("zh", "preferences/dpo_zh_demo.json"), dpo("dpo_gemma", "gemma", "zh")]
    stages += [sft(f"sft_{name}", name, "sft/toy_chat_fine_tuning.jsonl") for name in models if name != "gemma"]
    stages += [model("gemma_strict", tmp_path / "gemma", system_turns="error"),  # (the same folder, kept as it is)
               sft("sft_gemma_strict", "gemma_strict", "sft/toy_chat_fine_tuning.jsonl", drop_invalid=True)]
    result, m = run(tmp_path, "templates", stages)
    out = trained(result)
    assert "rejects system turns (it says 'System role not supported'): their text is folded into the first user turn" in out
    assert "leaves the system turn's text out of what it renders" in out
    first = json.loads((output_of(tmp_path, "templates", "dpo_gemma") / "first_sequence.json").read_text())
    assert "<start_of_turn>model\n" in first["text"] and "<start_of_turn>system" not in first["text"]  # (the prompt's end)
    turn = models["gemma"].convert_tokens_to_ids("<start_of_turn>")  # Gemma's special tokens, one id each
    assert turn >= 6400 and first["ids"].count(turn) >= 1
    assert all(m[f"sft_{name}"]["final_loss"] > 0 for name in models if name != "gemma")
    # drop_invalid covers the template check: Gemma's template kept strict, the 7 rows with a system turn are
    # left out and listed, and SFT trains on the others
    assert m["sft_gemma_strict"]["rows_invalid"] == 7 and m["sft_gemma_strict"]["demonstrations"] >= 1
    rejects = pd.read_parquet(output_of(tmp_path, "templates", "sft_gemma_strict") / "rejects.parquet")["problem"]
    assert len(rejects) == 7 and all("System role not supported" in r for r in rejects)


def test_every_ollama_template_renders_or_is_told_in_a_sentence():
    """The 37 real templates of Ollama's index, each on minimind's tokenizer: the model stage's check folds the
    system turn of the four that reject it, the pre-flight warns about the three that drop it, and every
    conversation shape renders."""
    from tasks.stage import template_preflight
    from tasks.stages.model import Params, open_tokenizer

    index = json.loads(Path(real("tokenizers/templates/ollama_template_index.json")).read_text())
    assert len(index) == 37
    shapes = [[{"role": "user", "content": "Hi"}],
              [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
              [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]]
    from alignment.data import adapt_system_turns

    complained, warned = set(), set()
    for entry in index:
        tokenizer = open_tokenizer(Params(name_or_path=real("tokenizers/minimind")), log=lambda _: None)
        tokenizer.chat_template = entry["template"]
        if adapt_system_turns(tokenizer, "merge") is not None:
            complained.add(entry["name"])
        warnings = []
        template_preflight(tokenizer, shapes, entry["name"], warnings.append)  # raises DataError if a shape fails
        warned |= {entry["name"] for w in warnings if "the system turn's text" in w}
    # what the templates themselves say, read off them: four reject a system turn (their system text is folded
    # into the first user turn and every shape then renders); zephyr, phi-3 and chatqa variants drop it
    assert complained == {"mistral-instruct", "starcoder2-instruct", "gemma-instruct", "magicoder"}
    assert warned == {"zephyr", "phi-3", "chatqa"}


def test_real_files_that_cannot_train_exit_2_with_a_sentence(tmp_path):
    """A Jupyter HTML page saved as .jsonl, turbo-alignment's KTO file (unpaired feedback), its pair file
    under other column names, and GPT-2's vocab.json/merges.txt without a
    tokenizer_config.json: each stops before any work with what to do."""
    cases = {
        "html": ([prefs("p", "preferences/junk-html-saved-as-jsonl/sample_preference.jsonl")], ["HTML", "Raw"]),
        "kto": ([prefs("p", "preferences/turbo-alignment-fixtures/train_kto.jsonl")], ["unpaired feedback", "is_desirable", "line 1"]),
        "names": ([prefs("p", "preferences/turbo-alignment-fixtures/train_preferences.jsonl")],
                  ["columns: {answer_l: rejected, answer_w: chosen, context: prompt}"]),
        "gpt2_files": ([model("m", bare_gpt2_folder(tmp_path / "gpt2-bare"))], ["tokenizer cannot be loaded", "save_pretrained"]),
    }
    # every case's stage in one pipeline: one run reports them all, in pipeline order
    together = [dict(stage, name=f"{stage['name']}_{name}") for name, (stages, _) in cases.items() for stage in stages]
    cases["together"] = (together, [w for _, words in cases.values() for w in words] + [f"{len(together)} problems"])
    for name, (stages, words) in cases.items():
        result, _ = run(tmp_path, name, stages)
        said = refused(result, *words)
        assert "temporary Prefect server" not in result.stdout + result.stderr  # found before anything started
        assert not list((tmp_path / f"runs-{name}").glob("stages/*/*")), name  # nothing written
    assert said.index("HTML") < said.index("unpaired feedback") < said.index("answer_l") < said.index("tokenizer cannot")


def test_a_template_error_before_or_inside_a_stage_is_the_same_sentence(tmp_path):
    """A template problem is the one bad-input report wherever it is found. system_turns: error keeps Gemma's
    template as it is, and SFT on OpenAI's chat file, whose rows have system turns, is stopped by the
    pre-flight with the rows and the template's own words, before any stage runs; Phi-3's template, which
    writes no tool calls, stops SFT on tool-calling rows inside the stage, before any training (with
    drop_invalid, it trains on the others)."""
    gemma = tiny_llama(tmp_path / "gemma", real_tokenizer("minimind", "gemma/tokenizer_config.json"))
    phi3 = tiny_llama(tmp_path / "phi3", real_tokenizer("phi-3-mini"))
    strict, _ = run(tmp_path, "strict", [model("m", gemma, system_turns="error"), sft("s", "m", "sft/toy_chat_fine_tuning.jsonl")])
    refused(strict, "the chat template says 'System role not supported'", "system_turns: merge", "rows [")
    assert not list((tmp_path / "runs-strict").glob("stages/*/*"))  # found before any stage ran
    # two stages that fail inside: both are reported, each led by its stage, and neither leaves an output
    tools, _ = run(tmp_path, "tools", [model("m", phi3), sft("s", "m", "sft/stock_toolcall_validation.jsonl"),
                                       sft("s2", "m", "sft/stock_toolcall_validation.jsonl", max_length=160)])
    said = refused(tools, "does not write the tool calls of 5 demonstration(s) (rows [1, 2, 4, 5, 9])", "use a template that does",
                   "2 problems", "stage 's' (MLflow run ", "stage 's2' (MLflow run ")
    assert said.count("does not write the tool calls") == 2
    assert list((tmp_path / "runs-tools").glob("stages/model/*/_SUCCESS.json"))  # (inside the sft stage)
    assert not list((tmp_path / "runs-tools").glob("stages/sft/*/_SUCCESS.json"))
    # with drop_invalid, SFT trains on the five rows without a call and lists the five it left out
    result, m = run(tmp_path, "tools_dropped", [model("m", phi3), sft("s", "m", "sft/stock_toolcall_validation.jsonl", drop_invalid=True)])
    trained(result)
    assert m["s"]["demonstrations"] == 5 and m["s"]["rows_invalid"] == 5
    rejects = pd.read_parquet(output_of(tmp_path, "tools_dropped", "s") / "rejects.parquet")["problem"]
    assert [r.split(": ")[1] for r in rejects] == [f"demonstration {i}" for i in (1, 2, 4, 5, 9)]


def test_a_model_folder_whose_tokenizer_json_or_config_cannot_be_parsed_is_a_sentence(tmp_path):
    """minimind's real tokenizer.json cut in half, as an interrupted download leaves it: the model stage's
    check says which folder and what it needs, as a DataError (exit 2), not transformers' traceback."""
    import shutil

    from tasks.data import DataError
    from tasks.stages.model import Params, open_tokenizer

    folder = tmp_path / "broken"
    folder.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(real(f"tokenizers/minimind/{f}"), folder / f)
    text = (folder / "tokenizer.json").read_text()
    (folder / "tokenizer.json").write_text(text[: len(text) // 2])
    with pytest.raises(DataError) as err:
        open_tokenizer(Params(name_or_path=str(folder)))
    assert str(err.value).startswith(f"{folder}: its tokenizer cannot be loaded (") and "save_pretrained" in str(err.value)
    assert "Traceback" not in str(err.value)
    # a whole tokenizer with a config.json whose hidden_size is text: the config is named, not the tokenizer
    shutil.copy(real("tokenizers/minimind/tokenizer.json"), folder / "tokenizer.json")
    (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": "big"}')
    with pytest.raises(DataError) as err:
        open_tokenizer(Params(name_or_path=str(folder)))
    said = str(err.value)  # transformers 5.24: "(Validation error for field 'hidden_size': Field 'hidden_size' expected int, ...)"
    assert said.startswith(f"{folder}: its config.json cannot be read (") and "'hidden_size'" in said, said
    assert said.endswith("); a model folder needs the config.json that save_pretrained writes for the model")
    assert "TypeError" not in said and "tokenizer" not in said


def test_answers_stop_where_the_chat_template_ends_the_turn(tmp_path):
    """A chat model ends its answer with its template's end-of-turn token, which need not be the tokenizer's EOS:
    Phi-3 writes <|end|> (its EOS is <|endoftext|>), Gemma <end_of_turn>, ChatML <|im_end|>. Sampling stops on
    each of them and on the EOS ids of the model's generation_config (what transformers' generate and TRL stop on),
    as evaluation and the RL trainers sample; params.stop_token_ids, when given, are the only ones."""
    import torch
    from transformers import LlamaForCausalLM

    from alignment.config import GRPOConfig, SamplingParams
    from alignment.data import turn_end_ids
    from alignment.evaluation import generate_answers
    from alignment.sampling import stop_token_ids
    from alignment.trainers.group import GroupTrainer

    phi3 = real_tokenizer("phi-3-mini")
    end = phi3.convert_tokens_to_ids("<|end|>")
    assert (phi3.eos_token, turn_end_ids(phi3)) == ("<|endoftext|>", (end,))
    gemma = real_tokenizer("minimind", "gemma/tokenizer_config.json")
    assert turn_end_ids(gemma) == (gemma.convert_tokens_to_ids("<end_of_turn>"),)
    chatml = real_tokenizer("minimind")
    assert turn_end_ids(chatml) == (chatml.eos_token_id,)  # <|im_end|> is minimind's EOS as well
    assert turn_end_ids(gpt2_tokenizer()) == ()  # no chat template

    model = LlamaForCausalLM.from_pretrained(tiny_llama(tmp_path / "phi3", phi3))
    assert stop_token_ids(SamplingParams(), phi3, model) == (phi3.eos_token_id, end)
    model.generation_config.eos_token_id = [phi3.eos_token_id, 32001, end]  # Phi-3-mini-instruct's
    assert stop_token_ids(SamplingParams(), phi3, model) == (phi3.eos_token_id, end, 32001)
    assert stop_token_ids(SamplingParams(stop_token_ids=(5,)), phi3, model) == (5,)
    cfg = GRPOConfig(iterations=1, prompts_per_batch=2, group_size=2, sampling=SamplingParams(max_new_tokens=8))
    trainer = GroupTrainer(model, phi3, ["Hi?", "Bye?"], {"len": lambda prompts, answers: [0.0] * len(answers)}, cfg)
    assert trainer.stop_ids == (phi3.eos_token_id, end, 32001)

    # a model that always says <|end|>: its answers are one token long, stopped, not 8 tokens cut off
    model.lm_head = torch.nn.Linear(model.config.hidden_size, len(phi3), bias=True)
    torch.nn.init.zeros_(model.lm_head.weight)
    with torch.no_grad():
        model.lm_head.bias.fill_(-10.0)[end] = 10.0
    texts, outs = generate_answers(model, phi3, [[{"role": "user", "content": "Hello?"}]] * 2, SamplingParams(max_new_tokens=8), 0)
    assert texts == ["", ""] and outs[0].answer_mask.sum(-1).tolist() == [1, 1]
    assert outs[0].answer_ids[:, 0].tolist() == [end, end]
