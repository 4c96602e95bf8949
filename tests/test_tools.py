"""Tool calling: rendering against the Llama 3.1 / 3.2 chat templates run by transformers, parsing of
hand-written outputs in every form (whole and streamed in random chunkings), and a constrained call
from the real default model."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest

from helpers import llama3_tokenizer_dir
from llama3.chat import JinjaChatFormat, Llama3ChatFormat
from llama3.structured import generate_with_processor
from llama3.tokenizer import load_tokenizer
from llama3.tools import (ToolCallParser, check_tool_choice, check_tools, parse_tool_calls, render_llama3,
                          render_tools_prompt, tool_call_constraint, tool_call_schema, tool_style)

# meta-llama/Llama-3.2-3B-Instruct's chat template (tokenizer_config.json), as llama.cpp keeps a copy of it
# in models/templates/meta-llama-Llama-3.2-3B-Instruct.jinja.
LLAMA32_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# meta-llama/Llama-3.1-8B-Instruct's: the same plus the built-in tools (brave_search, wolfram_alpha,
# code_interpreter, called after <|python_tag|> and closed by <|eom_id|>) and a fixed default date.
LLAMA31_TEMPLATE = LLAMA32_TEMPLATE.replace(
    """    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
""", """    {%- set date_string = "26 Jul 2024" %}
""").replace(
    """{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
""", """{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\\n\\n"}}
{%- endif %}
""").replace(
    """        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
""", """        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
""")
assert LLAMA31_TEMPLATE.count("builtin_tools") == 6, "the 3.1 edits did not apply"

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city, e.g. 'Paris' (< 1 s).",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "The city"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"]}}}
SONGS = {"type": "function", "function": {
    "name": "trending_songs", "description": "Returns the trending songs on a Music site",
    "parameters": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 10},
                                                    "genre": {"type": "string"}}, "required": ["n"]}}}
DATE = "21 Sep 2024"


@pytest.fixture(scope="module")
def llama_tok():
    return load_tokenizer(llama3_tokenizer_dir() + "/tokenizer.model")


@pytest.fixture(scope="module")
def hf_tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama3_tokenizer_dir())  # tokenizer.json + tokenizer_config.json


def hf_render(hf_tok, template, messages, **kwargs):
    text = hf_tok.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True,
                                      date_string=DATE, **kwargs)
    return text, hf_tok(text, add_special_tokens=False)["input_ids"]


def as_hf(messages):
    """The conversation as transformers' templates take it: arguments and tool results as dicts."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                               for c in m["tool_calls"]]
        if m["role"] == "tool":
            m["content"] = json.loads(m["content"])  # the templates tojson a string result (see render_llama3)
        out.append(m)
    return out


CONVERSATIONS = {
    "system and user": [{"role": "system", "content": "You are a helpful assistant."},
                        {"role": "user", "content": "What's the weather in Paris?"}],
    "user only": [{"role": "user", "content": "  Any new songs? <|eot_id|> "}],
    "a call and its result": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What's the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21, "sky": "clear"}'},
        {"role": "assistant", "content": "It is 21 degrees and clear."},
        {"role": "user", "content": "And in Rome?"}],
}


# ------------------------------------------------------------------------------ rendering
@pytest.mark.parametrize("template", ["3.1", "3.2"])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_llama3_rendering_equals_the_chat_template(template, name, llama_tok, hf_tok):
    messages = CONVERSATIONS[name]
    tools = [WEATHER, SONGS]
    text, ids = render_llama3(llama_tok, [_plain(m) for m in messages], tools, date_string=DATE)
    ref_text, ref_ids = hf_render(hf_tok, LLAMA31_TEMPLATE if template == "3.1" else LLAMA32_TEMPLATE,
                                  as_hf(messages), tools=tools)
    assert text == ref_text
    if name == "user only":  # a user's "<|eot_id|>" stays text for us; transformers makes it the token
        eot = llama_tok.special_tokens["<|eot_id|>"]
        assert ids.count(eot) == ref_ids.count(eot) - 1
    else:
        assert ids == ref_ids


def test_llama3_builtin_tools_equal_the_3_1_template(llama_tok, hf_tok):
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Search the web for the latest price of 1oz gold?"},
                {"role": "assistant", "content": "", "tool_calls": [{"id": "c", "type": "function", "function": {
                    "name": "brave_search", "arguments": '{"query": "latest price of 1oz gold"}'}}]},
                {"role": "tool", "content": '{"price": 2650}'}]
    builtin = ["brave_search", "wolfram_alpha"]
    text, ids = render_llama3(llama_tok, [_plain(m) for m in messages], [], builtin, date_string=DATE)
    ref_text, ref_ids = hf_render(hf_tok, LLAMA31_TEMPLATE, as_hf(messages), builtin_tools=builtin)
    assert text == ref_text and ids == ref_ids
    # Meta's format (prompt_format.md): the call after <|python_tag|>, closed by <|eom_id|>
    assert '<|python_tag|>brave_search.call(query="latest price of 1oz gold")<|eom_id|>' in text
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n"
                           "Tools: brave_search, wolfram_alpha\n\nCutting Knowledge Date: December 2023\n")


def test_render_tools_prompt_routes_llama3_vocabularies(llama_tok, hf_tok):
    messages = CONVERSATIONS["a call and its result"]
    text, ids = render_tools_prompt(Llama3ChatFormat(llama_tok), messages, [WEATHER], date_string=DATE)
    assert (text, ids) == hf_render(hf_tok, LLAMA32_TEMPLATE, as_hf(messages), tools=[WEATHER])
    text, _ = render_tools_prompt(Llama3ChatFormat(llama_tok), messages, [WEATHER], "none", date_string=DATE)
    assert "get_weather\", \"description\"" not in text and "Environment: ipython" not in text
    assert '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}<|eot_id|>' in text


def test_templates_that_render_tools_get_them_as_transformers_does(llama_tok, hf_tok):
    """The sandbox's tojson is transformers' (json.dumps, keys in the order given, no HTML escapes), so
    a template that renders tools itself writes them byte for byte as transformers does."""
    fmt = JinjaChatFormat(LLAMA32_TEMPLATE, llama_tok)
    assert tool_style(fmt) == "template"
    messages = CONVERSATIONS["system and user"]
    text, ids = render_tools_prompt(fmt, messages, [WEATHER], date_string=DATE)
    assert (text, ids) == hf_render(hf_tok, LLAMA32_TEMPLATE, messages, tools=[WEATHER])


def test_templates_without_tools_get_them_in_the_system_message(smollm2_fast):
    fmt = smollm2_fast.chat_format
    assert tool_style(fmt) == "hermes"
    messages = CONVERSATIONS["a call and its result"]
    text, ids = render_tools_prompt(fmt, messages, [WEATHER])
    assert text == fmt.render([
        {"role": "system", "content": "Answer briefly.\n\nYou can call functions. Their definitions, as JSON, are "
                                      "between <tools></tools>:\n<tools>\n" + json.dumps(WEATHER) + "\n</tools>\n"
                                      "To call a function, reply with only this, one block per call:\n<tool_call>\n"
                                      '{"name": <function name>, "arguments": <the arguments as a JSON object>}\n'
                                      "</tool_call>"},
        {"role": "user", "content": "What's the weather in Paris?"},
        {"role": "assistant", "content": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
                                         '"unit": "celsius"}}\n</tool_call>'},
        {"role": "user", "content": '<tool_response>\n{"temperature": 21, "sky": "clear"}\n</tool_response>'},
        {"role": "assistant", "content": "It is 21 degrees and clear."},
        {"role": "user", "content": "And in Rome?"}])[0]
    assert ids == fmt.render([{"role": m["role"], "content": m["content"]} for m in _hermes(messages)])[1]


def _hermes(messages):
    from llama3.tools import _hermes_messages

    return _hermes_messages([_plain(m) for m in messages], [WEATHER])


def _plain(m):
    from llama3.tools import _plain_message

    return _plain_message(m, 0)


@pytest.mark.parametrize("tools, choice, message", [
    ("x", "auto", "tools must be a list"),
    ([{"type": "function"}], "auto", r"tools\[0\] must be"),
    ([{"type": "function", "function": {"name": "bad name"}}], "auto", r"tools\[0\].function.name must be"),
    ([WEATHER, WEATHER], "auto", "defined twice"),
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "'nope', which is not among the tools"),
    ([], "required", "no tools were given"),
    ([WEATHER], "sometimes", "tool_choice must be"),
])
def test_bad_tools_and_choices(tools, choice, message):
    with pytest.raises(ValueError, match=message):
        check_tool_choice(choice, check_tools(tools))


# ------------------------------------------------------------------------------ parsing
def ids():
    counter = iter(range(1000))
    return lambda: f"call_{next(counter)}"


PARSE_CASES = [
    # (model output, expected content, expected [(name, arguments)])
    ('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}', None,
     [("get_weather", '{"city": "Paris", "unit": "celsius"}')]),
    ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}', None,
     [("get_weather", '{"city": "Paris"}')]),
    ('<|python_tag|>{\n    "type": "function",\n    "name": "trending_songs",\n    "parameters": {\n        "n": "10",\n'
     '        "genre": "all"\n    }\n}', None,
     [("trending_songs", '{\n        "n": "10",\n        "genre": "all"\n    }')]),
    ('  {"name": "f", "arguments": {"a": [1, 2, {"b": "}{\\""}]}}', None, [("f", '{"a": [1, 2, {"b": "}{\\""}]}')]),
    ('{"name": "f", "parameters": {"x": 1}}; {"name": "g", "parameters": {}}', None,
     [("f", '{"x": 1}'), ("g", "{}")]),
    ('{"name": "f", "arguments": "{\\"a\\": 1}"}', None, [("f", '{"a": 1}')]),
    ('{"name": "f"}', None, [("f", "{}")]),
    ('<|python_tag|>brave_search.call(query="latest price of 1oz gold")', None,
     [("brave_search", '{"query": "latest price of 1oz gold"}')]),
    ('<|python_tag|>wolfram_alpha.call(query="100th decimal of pi")', None,
     [("wolfram_alpha", '{"query": "100th decimal of pi"}')]),
    ("<|python_tag|>def is_prime(n):\n    return n > 1\n\nprint(is_prime(7))", None,
     [("code_interpreter", json.dumps({"code": "def is_prime(n):\n    return n > 1\n\nprint(is_prime(7))"}))]),
    ('<function=trending_songs>{"n": 10}</function>', None, [("trending_songs", '{"n": 10}')]),
    ('Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     "Let me check.", [("get_weather", '{"city": "Paris"}')]),
    ('<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "b", "arguments": {"k": true}}'
     '\n</tool_call>', "\n", [("a", "{}"), ("b", '{"k": true}')]),
    ("The weather in Paris is sunny.", "The weather in Paris is sunny.", []),
    ('{"answer": 42, "name": "x"}', '{"answer": 42, "name": "x"}', []),
    ('{"type": "object", "name": "x"}', '{"type": "object", "name": "x"}', []),
    ("if a < b and c > d: <tool_calls> <function=>", "if a < b and c > d: <tool_calls> <function=>", []),
    ('{"name": "f", "parameters": {"a": ', '{"name": "f", "parameters": {"a": ', []),  # cut short: not a call
    ("<tool_call>not json</tool_call> ok", "<tool_call>not json</tool_call> ok", []),
    ("", "", []),
]


@pytest.mark.parametrize("output, content, calls", PARSE_CASES)
def test_parse_whole_outputs(output, content, calls):
    got_content, got = parse_tool_calls(output, ids())
    assert got_content == content
    assert [(c.name, c.arguments) for c in got] == calls
    for c in got:
        assert c.id.startswith("call_") and isinstance(json.loads(c.arguments), dict)
        assert c.to_openai() == {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}


def stream(output: str, rng: random.Random):
    """Feed ``output`` in random pieces; return (content joined from deltas, calls joined from deltas, parser)."""
    parser = ToolCallParser(ids())
    cuts = sorted(rng.sample(range(1, len(output)), min(len(output) - 1, rng.randint(0, 12))) if output else [])
    pieces = [output[a:b] for a, b in zip([0] + cuts, cuts + [len(output)])]
    deltas = [d for p in pieces for d in parser.feed(p)] + parser.finish()
    content, calls = "", {}
    for d in deltas:
        content += d.get("content", "")
        for tc in d.get("tool_calls", []):
            if "id" in tc:  # the first delta of a call: id and name, then argument pieces
                assert tc["index"] == len(calls) and tc["function"]["arguments"] == ""
                calls[tc["index"]] = [tc["id"], tc["function"]["name"], ""]
            else:
                calls[tc["index"]][2] += tc["function"]["arguments"]
    return content, [tuple(v) for _, v in sorted(calls.items())], parser


@pytest.mark.parametrize("output, content, calls", [c for c in PARSE_CASES if not c[0].startswith('{"name": "f", '
                                                                                                    '"parameters": {"a": ')])
def test_streamed_deltas_join_to_the_same_calls(output, content, calls):
    for seed in range(40):
        joined_content, joined_calls, parser = stream(output, random.Random(seed))
        assert joined_content == parser.content == (content or "")
        assert [(name, args) for _, name, args in joined_calls] == calls
        assert [(c.id, c.name, c.arguments) for c in parser.calls] == joined_calls


def test_streaming_decides_early():
    parser = ToolCallParser(ids())
    assert parser.feed("Hello") == [{"content": "Hello"}]  # plain text goes out at once
    parser = ToolCallParser(ids())
    assert parser.feed("{") == [] and parser.feed('"na') == []  # may still become a call
    assert parser.feed('me": "get_weather", "parameters": {"ci') == [
        {"tool_calls": [{"index": 0, "id": "call_0", "type": "function",
                         "function": {"name": "get_weather", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]}]
    assert parser.feed('ty": "Paris"}}') == [{"tool_calls": [{"index": 0, "function": {"arguments": 'ty": "Paris"}'}}]}]
    parser = ToolCallParser(ids())
    assert parser.feed('{"answer"') == [{"content": '{"answer"'}]  # not a call: content as soon as it is clear
    parser = ToolCallParser(ids())
    assert parser.feed("Sure <tool_c") == [{"content": "Sure "}]  # "<tool_c" is held back


# ------------------------------------------------------------------------------ constrained calls
def test_call_schema():
    schema = tool_call_schema([WEATHER, SONGS], {"type": "function", "function": {"name": "trending_songs"}})
    assert schema == {"type": "object", "properties": {"name": {"const": "trending_songs"},
                                                       "parameters": SONGS["function"]["parameters"]},
                      "required": ["name", "parameters"]}
    both = tool_call_schema([WEATHER, SONGS], "required", argument_key="arguments")
    assert [o["properties"]["name"]["const"] for o in both["anyOf"]] == ["get_weather", "trending_songs"]
    with pytest.raises(ValueError, match="constrains nothing"):
        tool_call_schema([WEATHER], "auto")


def test_llama3_constraint_accepts_exactly_a_call(llama_tok):
    c = tool_call_constraint(llama_tok, Llama3ChatFormat(llama_tok), [WEATHER, SONGS], "required")
    for t in llama_tok.encode('{"name": "trending_songs", "parameters": {"n": 3}}'):
        c.accept(t)
    assert c.is_finished()
    assert tool_call_constraint(llama_tok, Llama3ChatFormat(llama_tok), [WEATHER], "auto") is None


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_default_model_makes_the_required_call(choice, smollm2_fast):
    llm = smollm2_fast
    messages = [{"role": "user", "content": "What's the weather like in Paris today, in celsius?"}]
    _, prompt = render_tools_prompt(llm.chat_format, messages, [WEATHER, SONGS], choice)
    for run in [{"temperature": 0}] + [{"seed": s} for s in range(1, 6)]:
        constraint = tool_call_constraint(llm.tokenizer, llm.chat_format, [WEATHER, SONGS], choice)
        out, reason = generate_with_processor(llm, prompt, constraint, max_new_tokens=120, **run)
        text = llm.tokenizer.decode(out)
        assert reason == "stop", text
        content, calls = parse_tool_calls(text)
        assert content is None and len(calls) == 1, text
        tool = {"get_weather": WEATHER, "trending_songs": SONGS}[calls[0].name]
        if isinstance(choice, dict):
            assert calls[0].name == "get_weather"
        jsonschema.validate(json.loads(calls[0].arguments), tool["function"]["parameters"])
