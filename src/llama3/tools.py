"""Tool calling: tools into the prompt, the model's calls out as OpenAI ``tool_calls``, and calls
that ``tool_choice`` requires guaranteed by a grammar.

Rendering (``render_tools_prompt``), by what the model has:

- a Llama 3 vocabulary without a template: Meta's format, as the Llama 3.1 chat template writes it
  (models/llama3_1/prompt_format.md; the 3.1/3.2 ``tokenizer_config.json``): a system header with
  ``Environment: ipython`` (and ``Tools: brave_search, wolfram_alpha`` for built-in tools), the JSON
  function definitions in the first user message ("Given the following functions, please respond
  with a JSON for a function call ..."), calls in the history as ``{"name": ..., "parameters": ...}``
  (built-in ones as ``<|python_tag|>brave_search.call(query="...")`` closed by ``<|eom_id|>``), and
  tool results under the ``ipython`` role;
- a chat template that renders ``tools``: the template, given ``tools=``;
- any other template: the definitions in the system message and calls as
  ``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` (the Hermes / Qwen convention), tool
  results as user messages in ``<tool_response>`` tags.

Parsing (``ToolCallParser``, streaming, and ``parse_tool_calls``) accepts every form these models
write: ``{"name": ..., "parameters"|"arguments": {...}}`` (several separated by ``;``), after
``<|python_tag|>`` or not; ``<|python_tag|>brave_search.call(query="...")`` and, after the tag,
plain code (a ``code_interpreter`` call); ``<function=name>{...}</function>``; and
``<tool_call>{...}</tool_call>``, also after some text.
"""

from __future__ import annotations

import ast
import datetime
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from .structured import JSON_WHITESPACE, GrammarConstraint, bound_numbers, close_objects
from .tokenizer import Tokenizer

BUILTIN_TOOLS = ("brave_search", "wolfram_alpha", "code_interpreter")
PYTHON_TAG = "<|python_tag|>"

# Meta's wording, as the Llama 3.1 / 3.2 chat templates write it.
_LLAMA3_CALL_FORMAT = 'Respond in the format {"name": function name, "parameters": dictionary of argument name ' \
                      'and its value}.Do not use variables.\n\n'
_LLAMA3_TOOLS_IN_USER = "Given the following functions, please respond with a JSON for a function call with its " \
                        "proper arguments that best answers the given prompt.\n\n" + _LLAMA3_CALL_FORMAT
_LLAMA3_TOOLS_IN_SYSTEM = "You have access to the following functions. To call a function, please respond with " \
                          "JSON for a function call." + _LLAMA3_CALL_FORMAT

_HERMES_SYSTEM = ("You can call functions. Their definitions, as JSON, are between <tools></tools>:\n<tools>\n{tools}\n"
                  "</tools>\nTo call a function, reply with only this, one block per call:\n<tool_call>\n"
                  '{{"name": <function name>, "arguments": <the arguments as a JSON object>}}\n</tool_call>')


# ------------------------------------------------------------------------------ requests
def check_tools(tools: Any) -> list[dict]:
    """OpenAI ``tools`` checked: a list of ``{"type": "function", "function": {"name", "description"?,
    "parameters"?, "strict"?}}``. Returns them as plain dicts; a bad entry raises ValueError naming it."""
    if not isinstance(tools, (list, tuple)):
        raise ValueError(f"tools must be a list of {{\"type\": \"function\", \"function\": {{...}}}}, "
                         f"got {type(tools).__name__}")
    out, names = [], set()
    for i, t in enumerate(tools):
        if not isinstance(t, Mapping) or t.get("type", "function") != "function" or \
                not isinstance(t.get("function"), Mapping):
            raise ValueError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}")
        f = t["function"]
        name = f.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
            raise ValueError(f"tools[{i}].function.name must be 1-64 letters, digits, '_', '.' or '-', got {name!r}")
        if name in names:
            raise ValueError(f"tools[{i}].function.name {name!r} is defined twice")
        names.add(name)
        params = f.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, Mapping):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object")
        if "description" in f and not isinstance(f["description"], str):
            raise ValueError(f"tools[{i}].function.description must be a string")
        out.append({"type": "function", "function": dict(f)})
    return out


def check_tool_choice(tool_choice: Any, tools: Sequence[dict]) -> str | dict:
    """"none", "auto", "required", or ``{"type": "function", "function": {"name": ...}}`` naming a tool."""
    if tool_choice is None:
        return "auto" if tools else "none"
    if tool_choice in ("none", "auto", "required"):
        if tool_choice == "required" and not tools:
            raise ValueError("tool_choice is 'required' but no tools were given")
        return tool_choice
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, Mapping) else None
    if not isinstance(name, str):
        raise ValueError('tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                         f'{{"name": ...}}}}, got {tool_choice!r}')
    if name not in {t["function"]["name"] for t in tools}:
        raise ValueError(f"tool_choice names the function {name!r}, which is not among the tools")
    return {"type": "function", "function": {"name": name}}


# ------------------------------------------------------------------------------ rendering
def tool_style(chat_format) -> str:
    """How this model calls tools: "llama3" (Meta's JSON; no template or a Llama 3.1+ template),
    "template" (its own template renders tools, calls as JSON), or "hermes" (<tool_call> tags, by
    its template or, for templates that know no tools, by our system message)."""
    template = getattr(chat_format, "template_text", None)
    if template is None:
        return "llama3"
    if not _template_uses_tools(template):
        return "hermes"
    return "hermes" if "<tool_call>" in template else "template"


def _template_uses_tools(template: str) -> bool:
    from jinja2 import meta
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        return "tools" in meta.find_undeclared_variables(ImmutableSandboxedEnvironment().parse(template))
    except Exception:  # noqa: BLE001 - a template that does not parse renders no tools (chat.py reports it)
        return False


def render_tools_prompt(chat_format, messages: Sequence[Mapping], tools: Sequence[dict] | None,
                        tool_choice: str | dict = "auto", *, builtin_tools: Sequence[str] = (),
                        date_string: str | None = None) -> tuple[str, list[int]]:
    """The prompt (text, token ids) for a conversation with tools, for ``chat_format`` (``llm.chat_format``).

    ``messages`` may hold OpenAI assistant messages with ``tool_calls`` (arguments as a JSON string
    or a dict) and ``tool`` (or ``ipython``) messages with the results. ``tool_choice="none"``
    renders no tools. ``builtin_tools`` (Llama 3.1+: brave_search, wolfram_alpha, code_interpreter)
    turn on Meta's built-in tools; ``date_string`` is the "Today Date" of Meta's system header
    (default: today, as "24 Nov 2026")."""
    tools = check_tools(tools or [])
    choice = check_tool_choice(tool_choice, tools)
    shown = [] if choice == "none" else tools
    for b in builtin_tools:
        if b not in BUILTIN_TOOLS:
            raise ValueError(f"unknown built-in tool {b!r}; expected one of {', '.join(BUILTIN_TOOLS)}")
    style = tool_style(chat_format)
    messages = [_plain_message(m, i) for i, m in enumerate(messages)]
    if style == "llama3":
        return render_llama3(chat_format.tokenizer, messages, shown, builtin_tools, date_string)
    if style == "template":
        text = chat_format.render_text(messages, add_generation_prompt=True, tools=shown or None,
                                       **({"builtin_tools": list(builtin_tools)} if builtin_tools else {}),
                                       **({"date_string": date_string} if date_string else {}))
        return text, _encode_rendered(chat_format.tokenizer, text, messages, shown)
    if _template_uses_tools(chat_format.template_text):  # a Hermes-style template of its own
        text = chat_format.render_text(messages, add_generation_prompt=True, tools=shown or None)
        return text, _encode_rendered(chat_format.tokenizer, text, messages, shown)
    return chat_format.render(_hermes_messages(messages, shown), add_generation_prompt=True)


def _plain_message(m: Mapping, i: int) -> dict:
    """An OpenAI message as templates read it: content a string, tool call arguments a dict."""
    if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
        raise ValueError(f"messages[{i}] must be a dict with a 'role'")
    out = dict(m)
    content = out.get("content")
    if isinstance(content, list):  # OpenAI content parts: keep the text ones
        content = "".join(p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text")
    out["content"] = content if content is not None else ""
    if not isinstance(out["content"], str):
        raise ValueError(f"messages[{i}].content must be a string or a list of text parts")
    if out.get("tool_calls"):
        calls = []
        for j, call in enumerate(out["tool_calls"]):
            f = call.get("function", {}) if isinstance(call, Mapping) else {}
            args = f.get("arguments", {})
            if isinstance(args, str):
                try:
                    args = json.loads(args) if args.strip() else {}
                except ValueError as e:
                    raise ValueError(f"messages[{i}].tool_calls[{j}].function.arguments is not JSON: {e}") from None
            if not isinstance(f.get("name"), str) or not isinstance(args, Mapping):
                raise ValueError(f"messages[{i}].tool_calls[{j}] must have function.name and function.arguments "
                                 "(a JSON object)")
            calls.append({"id": call.get("id"), "type": "function", "function": {"name": f["name"], "arguments": args}})
        out["tool_calls"] = calls
    else:
        out.pop("tool_calls", None)
    return out


def _today() -> str:
    return datetime.date.today().strftime("%d %b %Y")


def render_llama3(tokenizer: Tokenizer, messages: Sequence[Mapping], tools: Sequence[dict],
                  builtin_tools: Sequence[str] = (), date_string: str | None = None,
                  tools_in_user_message: bool = True) -> tuple[str, list[int]]:
    """Meta's Llama 3.1+ prompt with tools, exactly as the Llama 3.1 chat template renders it:
    (text, ids), message contents encoded as plain text and only the format's markup as special tokens."""
    missing = [n for n in ("<|start_header_id|>", "<|eom_id|>", PYTHON_TAG) if n not in tokenizer.special_tokens]
    if missing:
        raise ValueError(f"{tokenizer.path}: the vocabulary lacks {missing}: not a Llama 3.1+ vocabulary")
    parts: list[tuple[str, bool]] = []  # (text, is a special token)

    def special(name):
        parts.append((name, True))

    def text(s):
        parts.append((s, False))

    def header(role):
        special("<|start_header_id|>"), text(role), special("<|end_header_id|>"), text("\n\n")

    def tools_json():
        return "".join(json.dumps(t, indent=4, ensure_ascii=False) + "\n\n" for t in tools)

    messages = list(messages)
    system = ""
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"].strip(), messages[1:]
    special("<|begin_of_text|>")
    header("system")
    if builtin_tools or tools:
        text("Environment: ipython\n")
    if builtin_tools:
        text("Tools: " + ", ".join(t for t in builtin_tools if t != "code_interpreter") + "\n\n")
    text(f"Cutting Knowledge Date: December 2023\nToday Date: {date_string or _today()}\n\n")
    if tools and not tools_in_user_message:
        text(_LLAMA3_TOOLS_IN_SYSTEM)
        text(tools_json())
    text(system)
    special("<|eot_id|>")
    if tools and tools_in_user_message:
        if not messages:
            raise ValueError("with tools, the conversation needs a first user message to put them in")
        first, messages = messages[0]["content"].strip(), messages[1:]
        header("user")
        text(_LLAMA3_TOOLS_IN_USER)
        text(tools_json() + first)
        special("<|eot_id|>")
    for m in messages:
        role = m["role"]
        if m.get("tool_calls"):
            if len(m["tool_calls"]) != 1:
                raise ValueError("Llama 3's format holds one tool call per assistant message; split them")
            call = m["tool_calls"][0]["function"]
            header("assistant")
            if builtin_tools and call["name"] in builtin_tools:
                special(PYTHON_TAG)
                text(call["name"] + ".call(" + ", ".join(f'{k}="{v}"' for k, v in call["arguments"].items()) + ")")
            else:
                text(f'{{"name": "{call["name"]}", "parameters": {json.dumps(call["arguments"], ensure_ascii=False)}}}')
            special("<|eom_id|>" if builtin_tools else "<|eot_id|>")
        elif role in ("tool", "ipython"):
            header("ipython")
            text(m["content"])
            special("<|eot_id|>")
        else:
            header(role)
            text(m["content"].strip())
            special("<|eot_id|>")
    header("assistant")
    # Plain text between special tokens is encoded whole (as a tokenizer splits a string at its special
    # tokens), and no text part ever becomes a special token, whatever it contains.
    ids: list[int] = []
    run = ""
    for s, is_special in parts:
        if is_special:
            ids += tokenizer.encode(run) + [tokenizer.special_tokens[s]]
            run = ""
        else:
            run += s
    ids += tokenizer.encode(run)
    return "".join(s for s, _ in parts), ids


def _encode_rendered(tokenizer: Tokenizer, text: str, messages: Sequence[Mapping], tools: Sequence[dict]) -> list[int]:
    """Ids of a template's output, special tokens recognised by name. Safe because no user-given
    string (contents, arguments, tool definitions) may contain a special token's name."""
    given = [m["content"] for m in messages] + [json.dumps(m.get("tool_calls", []), ensure_ascii=False)
                                               for m in messages] + [json.dumps(tools, ensure_ascii=False)]
    for s in given:
        hit = next((name for name in tokenizer.special_tokens if name in s), None)
        if hit:
            raise ValueError(f"a message or tool definition contains the special-token text {hit!r}")
    ids = tokenizer.encode(text, allow_special=True)
    if tokenizer.add_bos and tokenizer.bos_id is not None and (not ids or ids[0] != tokenizer.bos_id):
        ids = [tokenizer.bos_id] + ids
    return ids


def _hermes_messages(messages: Sequence[dict], tools: Sequence[dict]) -> list[dict]:
    """Messages for a template that knows no tools: the definitions in the system message, calls and
    results as text in the Hermes convention."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            blocks = [json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                                 ensure_ascii=False) for c in m["tool_calls"]]
            content = (m["content"] + "\n" if m["content"] else "") + \
                "\n".join(f"<tool_call>\n{b}\n</tool_call>" for b in blocks)
            out.append({"role": "assistant", "content": content})
        elif m["role"] in ("tool", "ipython"):
            out.append({"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    if tools:
        prompt = _HERMES_SYSTEM.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


# ------------------------------------------------------------------------------ constrained calls
def tool_call_schema(tools: Sequence[dict], tool_choice: str | dict, argument_key: str = "parameters") -> dict:
    """The JSON schema of one call that ``tool_choice`` allows: the function's name as a ``const`` and
    its parameters' schema under ``argument_key`` (any of the tools for "required")."""
    tools = check_tools(tools)
    choice = check_tool_choice(tool_choice, tools)
    if choice in ("none", "auto"):
        raise ValueError(f"tool_choice {choice!r} constrains nothing")
    chosen = [t["function"] for t in tools if choice == "required" or t["function"]["name"] ==
              choice["function"]["name"]]
    options = [{"type": "object",
                "properties": {"name": {"const": f["name"]},
                               argument_key: dict(f.get("parameters") or {"type": "object", "properties": {}})},
                "required": ["name", argument_key]} for f in chosen]
    return options[0] if len(options) == 1 else {"anyOf": options}


def tool_call_constraint(tokenizer: Tokenizer, chat_format, tools: Sequence[dict],
                         tool_choice: str | dict) -> GrammarConstraint | None:
    """A GrammarConstraint that makes the reply one call ``tool_choice`` allows, written the way this
    model writes calls; None for "none" and "auto". Raises GrammarError for a parameters schema that
    cannot be enforced (the server answers 400)."""
    import llguidance

    tools = check_tools(tools)
    if check_tool_choice(tool_choice, tools) in ("none", "auto"):
        return None
    # Objects are closed (no properties beyond the schema's) whatever "strict" says: a small model given
    # the room pads a call with made-up keys. "strict" decides whether keywords that cannot be enforced
    # are refused (GrammarError) or ignored.
    strict = all(t["function"].get("strict") is True for t in tools)
    if tool_style(chat_format) != "hermes":
        return GrammarConstraint.json_schema(tokenizer, close_objects(tool_call_schema(tools, tool_choice)),
                                             strict=strict)
    schema = bound_numbers(close_objects(tool_call_schema(tools, tool_choice, argument_key="arguments")))
    schema["x-guidance"] = {"whitespace_pattern": JSON_WHITESPACE, "lenient": not strict}
    grammar = f'start: "<tool_call>\\n" call "\\n</tool_call>"\ncall: %json {json.dumps(schema)}'
    return GrammarConstraint(tokenizer, llguidance.LLMatcher.grammar_from_lark(grammar), "json_schema")


# ------------------------------------------------------------------------------ parsing
@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as text

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class _Call:
    """A call as the scan sees it: its name once known, its arguments text so far."""
    name: str | None
    arguments: str
    complete: bool


@dataclass
class _Scan:
    items: list = field(default_factory=list)  # str (content) or _Call, in order


class ToolCallParser:
    """Turns the model's output, fed in pieces as it streams, into OpenAI chat deltas.

    ``feed(text)`` and ``finish()`` return delta dicts for ``choices[i].delta``: ``{"content": ...}``
    for plain text, and for each call first ``{"tool_calls": [{"index", "id", "type", "function":
    {"name", "arguments": ""}}]}`` then ``{"tool_calls": [{"index", "function": {"arguments": piece}}]}``
    as its arguments arrive. Text that may still turn out to open a call (``{`` at the start, a
    ``<`` that may begin ``<tool_call>``) is held back until it is decided. Afterwards ``content``
    and ``calls`` hold the whole result; the pieces streamed join to exactly these.
    """

    def __init__(self, new_id: Callable[[], str] = new_call_id):
        self._new_id = new_id
        self._text = ""
        self._content_sent = 0  # characters of content emitted so far
        self._sent: list[list] = []  # per call: [id, name sent?, argument characters sent]
        self.content = ""
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> list[dict]:
        self._text += text
        return self._emit(_scan(self._text, final=False))

    def finish(self) -> list[dict]:
        scan = _scan(self._text, final=True)
        deltas = self._emit(scan)
        self.calls = [ToolCall(self._sent[k][0], c.name, c.arguments)
                      for k, c in enumerate(c for c in scan.items if isinstance(c, _Call)) if k < len(self._sent)]
        return deltas

    def _emit(self, scan: _Scan) -> list[dict]:
        deltas = []
        content = "".join(x for x in scan.items if isinstance(x, str))
        if len(content) > self._content_sent:
            deltas.append({"content": content[self._content_sent:]})
            self._content_sent = len(content)
            self.content = content
        calls = [x for x in scan.items if isinstance(x, _Call)]
        for k, call in enumerate(calls):
            if call.name is None:
                break
            if k == len(self._sent):
                self._sent.append([self._new_id(), True, 0])
                deltas.append({"tool_calls": [{"index": k, "id": self._sent[k][0], "type": "function",
                                               "function": {"name": call.name, "arguments": ""}}]})
            sent = self._sent[k][2]
            if len(call.arguments) > sent:
                deltas.append({"tool_calls": [{"index": k, "function": {"arguments": call.arguments[sent:]}}]})
                self._sent[k][2] = len(call.arguments)
        return deltas


def parse_tool_calls(text: str, new_id: Callable[[], str] = new_call_id) -> tuple[str | None, list[ToolCall]]:
    """(content or None, calls) of a whole reply."""
    parser = ToolCallParser(new_id)
    parser.feed(text)
    parser.finish()
    return (parser.content or None) if parser.calls else parser.content, parser.calls


def _scan(text: str, final: bool) -> _Scan:
    """Parse the whole output so far. Prefix-stable: what it calls content or a call's name and
    arguments never changes as text is added (undecided text is left out until decided)."""
    scan = _Scan()
    start = len(text) - len(text.lstrip())
    rest = text[start:]
    if not rest or (PYTHON_TAG.startswith(rest) and not final):
        if final:
            scan.items.append(text)
        return scan  # whitespace, or what may become <|python_tag|>
    if rest.startswith(PYTHON_TAG):
        body_start = start + len(PYTHON_TAG)
        body = text[body_start:].lstrip()
        if not body.startswith("{") and (body or final):
            if final:  # tool.call(...) or code: decided at the end
                scan.items.append(_builtin_call(body))
            return scan
        state = _json_calls(text, body_start, final, scan)
        if state == "not_call":
            scan.items = [text]
        return scan
    if rest.startswith("{"):
        state = _json_calls(text, start, final, scan)
        if state != "not_call":
            return scan
    _tagged(text, final, scan)  # plain text, perhaps with <tool_call> or <function=...> blocks
    return scan


def _json_calls(text: str, i: int, final: bool, scan: _Scan) -> str:
    """Calls as JSON objects from text[i], separated by ';' or whitespace, added to ``scan``. Returns
    "calls", "undecided" (the first object may still become a call: nothing added) or "not_call"
    (the first object is no call: nothing added)."""
    first = True
    while True:
        i = _skip_ws(text, i)
        if i >= len(text):
            return "calls"
        if not first:
            if text[i] == ";":
                i = _skip_ws(text, i + 1)
                if i >= len(text):
                    return "calls"
            if text[i] != "{":  # text after the calls: content
                scan.items.append(text[i:])
                return "calls"
        state, call, end = _call_object(text, i, final)
        if state in ("not_call", "undecided"):
            if first:
                return state
            if state == "not_call":
                scan.items.append(text[i:])
            return "calls"
        scan.items.append(call)
        if state == "partial":
            return "calls"
        first, i = False, end


def _tagged(text: str, final: bool, scan: _Scan) -> None:
    """Content with <tool_call>...</tool_call> and <function=name>...</function> blocks in it."""
    i = 0
    opener = re.compile(r"<tool_call>|<function=")
    while i < len(text):
        m = opener.search(text, i)
        if m is None:
            hold = 0 if final else _partial_suffix(text[i:], ("<tool_call>", "<function="))
            scan.items.append(text[i:len(text) - hold])
            return
        scan.items.append(text[i:m.start()])
        if m.group() == "<tool_call>":
            j = _skip_ws(text, m.end())
            if j >= len(text):
                if final:
                    scan.items.append(text[m.start():])
                return
            state, call, end = _call_object(text, j, final)
            if state == "undecided" or (state == "partial" and not final):
                if state == "partial":
                    scan.items.append(call)
                return
            if state == "not_call" or state == "partial":
                scan.items.append(text[m.start():])
                return
            scan.items.append(call)
            k = _skip_ws(text, end)
            if text.startswith("</tool_call>", k):
                i = k + len("</tool_call>")
            elif not final and "</tool_call>".startswith(text[k:]):
                return
            else:
                i = k
        else:
            close = text.find(">", m.end())
            if close < 0 or not re.fullmatch(r"[A-Za-z0-9_.\-]+", text[m.end():close]):
                if final or close >= 0:
                    scan.items.append(text[m.start():])
                return
            name = text[m.end():close]
            end = text.find("</function>", close + 1)
            if end < 0:
                args = text[close + 1:]
                if final:
                    if _is_object(args.strip()):
                        scan.items.append(_Call(name, args.strip(), True))
                    else:
                        scan.items.append(text[m.start():])
                    return
                args = args[:len(args) - _partial_suffix(args, ("</function>",))].lstrip()
                scan.items.append(_Call(name, args.rstrip(), False))
                return
            args = text[close + 1:end].strip()
            if not _is_object(args):
                scan.items.append(text[m.start():])
                return
            scan.items.append(_Call(name, args, True))
            i = end + len("</function>")


def _call_object(text: str, i: int, final: bool) -> tuple[str, _Call | None, int]:
    """A call object {"name": ..., "parameters"|"arguments": {...}} at text[i] == "{":
    ("complete", call, end), ("partial", call so far, -1), ("undecided", None, -1) or ("not_call", None, -1)."""
    members = []  # (key, value start, value end or None)
    j = i + 1
    complete_at = -1
    while True:
        j = _skip_ws(text, j)
        if j >= len(text):
            break
        if text[j] == "}" and not members:
            return "not_call", None, -1
        if text[j] != '"':
            return "not_call", None, -1
        kend = _string_end(text, j)
        if kend is None:
            break
        key = json.loads(text[j:kend])
        if not members and key not in ("name", "type"):
            return "not_call", None, -1
        j = _skip_ws(text, kend)
        if j >= len(text):
            members.append((key, None, None))
            break
        if text[j] != ":":
            return "not_call", None, -1
        j = _skip_ws(text, j + 1)
        if j >= len(text):
            members.append((key, None, None))
            break
        vend = _value_end(text, j)
        members.append((key, j, vend))
        if vend is None:
            break
        j = _skip_ws(text, vend)
        if j >= len(text):
            break
        if text[j] == ",":
            j += 1
            continue
        if text[j] == "}":
            complete_at = j + 1
            break
        return "not_call", None, -1
    values = {k: (s, e) for k, s, e in members}
    if "type" in values and values["type"][1] is not None and json.loads(text[slice(*values["type"])]) != "function":
        return "not_call", None, -1
    name = None
    if "name" in values and values["name"][1] is not None:
        name = json.loads(text[slice(*values["name"])])
        if not isinstance(name, str):
            return "not_call", None, -1
    arg_key = next((k for k in ("parameters", "arguments") if k in values), None)
    if complete_at >= 0:
        args = text[slice(*values[arg_key])] if arg_key else "{}"
        if arg_key and args.startswith('"'):  # arguments given as a JSON string holding the object
            args = json.loads(args)
        if name is None or not _is_object(args):
            return "not_call", None, -1
        return "complete", _Call(name, args, True), complete_at
    if final or name is None:
        return ("not_call" if final else "undecided"), None, -1
    args = ""
    if arg_key and values[arg_key][0] is not None:
        start, end = values[arg_key]
        args = text[start:end] if end is not None else text[start:].rstrip()
        if args.startswith('"'):  # a stringified object cannot be streamed faithfully: wait for the end
            args = ""
    return "partial", _Call(name, args, False), -1


def _builtin_call(body: str) -> _Call:
    """What follows <|python_tag|> when it is not JSON: ``tool.call(query="...")`` or code to run."""
    m = re.fullmatch(r"(\w+)\.call\((.*)\)", body.strip(), re.S)
    if m:
        try:
            node = ast.parse(f"f({m.group(2)})", mode="eval").body
            kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
            if not node.args and None not in kwargs:
                return _Call(m.group(1), json.dumps(kwargs, ensure_ascii=False), True)
        except (SyntaxError, ValueError):
            pass
    return _Call("code_interpreter", json.dumps({"code": body.strip()}, ensure_ascii=False), True)


def _is_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _string_end(text: str, i: int) -> int | None:
    """Index after the JSON string starting at text[i] == '"', or None if it is not closed yet."""
    j = i + 1
    while j < len(text):
        if text[j] == "\\":
            j += 2
            continue
        if text[j] == '"':
            return j + 1
        j += 1
    return None


def _value_end(text: str, i: int) -> int | None:
    """Index after the JSON value starting at text[i], or None if it may still go on."""
    if text[i] == '"':
        return _string_end(text, i)
    if text[i] in "{[":
        depth, j = 0, i
        while j < len(text):
            c = text[j]
            if c == '"':
                end = _string_end(text, j)
                if end is None:
                    return None
                j = end
                continue
            if c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
        return None
    m = re.compile(r"[^,}\]\s]*").match(text, i)  # a number, true, false or null
    return m.end() if m.end() < len(text) else None


def _partial_suffix(text: str, markers: Iterable[str]) -> int:
    """Length of the longest end of ``text`` that is a proper beginning of one of the markers."""
    best = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:n]):
                best = n
                break
    return best
