"""Chat messages as the layouts in use write them (role/content, ShareGPT from/value, content as parts,
tool calls and tool results), normalised to {role, content[, tool_calls, tool_call_id, name]}."""

from __future__ import annotations

import json
from typing import Any

from tasks.reading import _kind


class RowError(ValueError):
    """One row cannot be read; the message is meant for the user as it is."""


# role names of the layouts in use -> ours: ShareGPT's human/gpt, Gemma's model, turbo-alignment's bot
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "model": "assistant", "bot": "assistant", "tool": "tool", "observation": "tool", "function": "tool",
         "function_call": "assistant"}  # (ShareGPT's function_call / observation: a tool call and its result)
TOOLS = "tools"  # the role of the message that carries a conversation's tool definitions (first, if any); the
# core reads it as alignment.data.TOOLS (which cannot import the task layer)


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise RowError(f"{what}: expected text, found {_kind(value)}")
    if not value.strip():
        raise RowError(f"{what}: empty or whitespace-only text")
    return value


def _content(value: Any, what: str) -> str:
    """A message's text: a string, or a list of parts ({"type": "text", "text" | "value": ...}, OpenAI's and
    LLaMA-Factory v1's layouts) joined in order."""
    if isinstance(value, list):
        texts = []
        for k, part in enumerate(value, start=1):
            kind = part.get("type", "text") if isinstance(part, dict) else None
            if kind != "text":
                raise RowError(f"{what}: part {k} is {kind or _kind(part)!r}, not text; alignflow trains on text only, "
                               f"so leave such rows out (or drop_invalid: true)")
            texts.append(_text(part.get("text") if part.get("text") is not None else part.get("value"), f"{what}, part {k}"))
        value = "".join(texts)
    return _text(value, what)


def _tool_calls(value: Any, what: str) -> list[dict]:
    """OpenAI's tool_calls ([{"type": "function", "function": {"name", "arguments"}}]) or ShareGPT's
    function_call value ({"name", "arguments"} or a list of them, maybe as JSON text), as
    [{"type": "function", "function": {"name": str, "arguments": dict}}] (what chat templates read)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RowError(f"{what}: a tool call must be JSON {{\"name\": ..., \"arguments\": {{...}}}}") from None
    calls = []
    for k, call in enumerate(value if isinstance(value, list) else [value], start=1):
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RowError(f"{what}: tool call {k} has no function name")
        arguments = function.get("arguments") or {}
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                raise RowError(f"{what}: tool call {k} ({function['name']}): its arguments are not JSON") from None
        calls.append({"type": "function", "function": {"name": function["name"], "arguments": arguments}})
    return calls


def messages_of(value: Any, column: str) -> list[dict]:
    """[{role, content}] from role/content or ShareGPT from/value messages, roles normalised; content may be
    a list of text parts. Tool calls (OpenAI's tool_calls, content absent; ShareGPT's function_call turn)
    are assistant messages with `tool_calls`; tool results (OpenAI's tool role, ShareGPT's observation) are
    `tool` messages."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise RowError(f"column {column!r}: expected a list of messages, found {_kind(value)}")
    out = []
    for n, m in enumerate(value, start=1):
        if not isinstance(m, dict):
            raise RowError(f"column {column!r}: message {n} is {_kind(m)}, not an object with role and content")
        role = m.get("role") if m.get("role") is not None else m.get("from")
        content = m.get("content") if m.get("content") is not None else m.get("value")
        what = f"column {column!r}: message {n}"
        if role is None:
            raise RowError(f"{what} has no 'role' (or ShareGPT 'from'); keys: {sorted(m)}")
        if role not in ROLES:
            raise RowError(f"{what} has role {role!r}; use system, user, assistant or tool "
                           f"(ShareGPT: system, human, gpt, function_call, observation)")
        if role == "function_call":
            out.append({"role": "assistant", "content": "", "tool_calls": _tool_calls(content, what)})
        elif m.get("tool_calls"):
            text = _content(content, f"{what} content") if content not in (None, "", []) else ""
            out.append({"role": "assistant", "content": text, "tool_calls": _tool_calls(m["tool_calls"], what)})
        else:
            message = {"role": ROLES[role], "content": _content(content, f"{what} content")}
            message.update({k: m[k] for k in ("tool_call_id", "name") if ROLES[role] == "tool" and m.get(k) is not None})
            out.append(message)
    return out


def with_tools(prompt, row: dict):
    """A `tools` column (OpenAI's list, LLaMA-Factory's JSON text) as the conversation's first message,
    {"role": "tools", "content": "", "tools": [...]}: rendered through the template's tools= argument."""
    tools = row.get("tools")
    if tools is None or tools == "" or tools == [] or isinstance(prompt, str):
        return prompt
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise RowError("column 'tools': not JSON (a list of function definitions)") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RowError(f"column 'tools': expected a list of function definitions, found {_kind(tools)}")
    return [{"role": TOOLS, "content": "", "tools": tools}, *prompt]


def with_system(prompt, row: dict):
    """A top-level `system` column (LLaMA-Factory's ShareGPT and Alpaca layouts) as the conversation's first
    turn; a text prompt with a system prompt becomes a conversation. A conversation that has a system turn
    of its own keeps it."""
    system = row.get("system")
    if not isinstance(system, str) or not system.strip():
        return prompt
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return turns if turns[0]["role"] == "system" else [{"role": "system", "content": system}, *turns]


def readable_message(m: dict) -> str:
    calls = " ".join(f"[calls {c['function']['name']}({json.dumps(c['function']['arguments'], ensure_ascii=False)})]"
                     for c in m.get("tool_calls", []))
    return f"{m['role']}: {m['content']}{' ' if m['content'] and calls else ''}{calls}"
