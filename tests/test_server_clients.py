"""What real clients send to `llama3 serve` (issue 14), driven by the clients themselves: the official
`openai` client for tool calls (streaming and not), structured output (``beta.chat.completions.parse``
with a pydantic model, ``json_schema`` validated with ``jsonschema`` over many seeds, the ``grammar``
and ``regex`` extensions), ``logit_bias``, echo with prompt logprobs, models/{id} and embeddings; and
lm-evaluation-harness's ``local-completions`` model against the Python API's model class.

References are computed here: the prompt logprobs as ``log_softmax`` of the model's own forward
pass, embeddings by ``llama3.embeddings.embed`` on the same model.
"""

import base64
import json
import re
from typing import Literal

import httpx
import jsonschema
import numpy as np
import pytest
import torch
from pydantic import BaseModel, Field
from test_evaluate import MC_TASK
from test_server import Server, error_of

import llama3
from llama3.embeddings import embed
from llama3.sampling import SamplingParams
from llama3.server.app import sampling_defaults

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}}}
SONGS = {"type": "function", "function": {
    "name": "trending_songs", "description": "The most played songs of a country",
    "parameters": {"type": "object", "properties": {"country": {"type": "string", "maxLength": 40},
                                                    "n": {"type": "integer", "minimum": 1, "maximum": 20}},
                   "required": ["country", "n"]}}}
TOOLS = {"get_weather": WEATHER, "trending_songs": SONGS}
ASK = [{"role": "user", "content": "What's the weather like in Paris today, in celsius?"}]


@pytest.fixture(scope="module")
def server():
    # A float32 KV cache: the engine's prefill then equals Transformer.forward to float32 rounding (measured
    # 1.2e-5), which the echo-logprobs tests below rely on. With the default float16 cache, rounding the keys
    # and values moves prompt logprobs by up to 5e-3 with float32 prefill GEMMs and up to 0.2 with bfloat16
    # ones (each bfloat16 rounding boundary a small change crosses is a 2^-9 step), so the comparison
    # would measure the cache, not the echo.
    s = Server("--max-batch", "8", "--ctx", "512", "--kv-dtype", "float32")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def llm():
    return llama3.load(quiet=True, kv_dtype="float32")  # the same path the server runs


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=300)


# ------------------------------------------------------------------------------ tools
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "trending_songs"}}])
def test_tool_calls(client, choice):
    """required / named: constrained decoding guarantees one valid call, greedy and sampled."""
    for run in [{"temperature": 0}, {"seed": 1}, {"seed": 2}, {"seed": 3}]:
        r = client.chat.completions.create(model="default", messages=ASK, tools=[WEATHER, SONGS], tool_choice=choice,
                                           max_tokens=100, **run)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.content is None, c
        (call,) = c.message.tool_calls
        assert call.type == "function" and re.fullmatch(r"call_[0-9a-f]{24}", call.id)
        if isinstance(choice, dict):
            assert call.function.name == "trending_songs"
        jsonschema.validate(json.loads(call.function.arguments), TOOLS[call.function.name]["function"]["parameters"])


def test_tool_calls_streaming_equal_the_whole_reply(client):
    """The streamed deltas: the call's id, type and name first, then its arguments in several pieces that
    join to exactly the arguments the same request gets unstreamed (greedy)."""
    kw = {"model": "default", "messages": ASK, "tools": [WEATHER, SONGS], "tool_choice": "required",
          "max_tokens": 100, "temperature": 0}
    whole = client.chat.completions.create(**kw).choices[0].message.tool_calls[0]
    chunks = [c for c in client.chat.completions.create(**kw, stream=True) if c.choices]
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    first, rest = deltas[0], deltas[1:]
    assert first.index == 0 and first.id.startswith("call_") and first.type == "function"
    assert first.function.name == whole.function.name and first.function.arguments == ""
    assert len(rest) > 1 and all(d.index == 0 and d.id is None for d in rest)
    assert "".join(d.function.arguments for d in rest) == whole.function.arguments
    assert [c.choices[0].finish_reason for c in chunks][-1] == "tool_calls"
    assert not any(c.choices[0].delta.content for c in chunks)


def test_auto_parses_calls_the_model_writes(client):
    """tool_choice "auto" leaves the reply free and parses whatever calls it holds. This small model seldom
    calls on its own, so the regex extension makes it write one the way its prompt shows (a <tool_call>
    block): the reply comes back as tool_calls, whole and streamed."""
    regex = r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "(Paris|Lyon)", "unit": "celsius"\}\}' \
            r"\n</tool_call>"
    kw = {"model": "default", "messages": ASK, "tools": [WEATHER, SONGS], "max_tokens": 60, "temperature": 0,
          "extra_body": {"regex": regex}}
    c = client.chat.completions.create(**kw).choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    (call,) = c.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) in ({"city": "Paris", "unit": "celsius"},
                                                   {"city": "Lyon", "unit": "celsius"})
    chunks = [x for x in client.chat.completions.create(**kw, stream=True) if x.choices]
    deltas = [tc for x in chunks for tc in (x.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "get_weather"
    assert "".join(d.function.arguments for d in deltas) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_results_fed_back(client, llm):
    """An assistant message with tool_calls (content null) and a tool message are accepted; tool_choice
    "none" renders no tools, so a conversation without tool history equals plain chat."""
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}
    messages = ASK + [{"role": "assistant", "content": None, "tool_calls": [call]},
                      {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21, "sky": "sunny"}'}]
    r = client.chat.completions.create(model="default", messages=messages, tools=[WEATHER], max_tokens=30,
                                       temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls") and r.usage.prompt_tokens > 40
    none = client.chat.completions.create(model="default", messages=ASK, tools=[WEATHER], tool_choice="none",
                                          max_tokens=20, temperature=0)
    assert none.choices[0].message.content == llm.chat(ASK, max_new_tokens=20, temperature=0).text
    assert none.choices[0].message.tool_calls is None


@pytest.mark.parametrize("payload, param", [
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, None),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
])
def test_bad_tools_are_400(server, payload, param):
    error_of(httpx.post(server.base + "/v1/chat/completions", json={"messages": ASK, **payload}), 400,
             "invalid_request_error", param)


# ------------------------------------------------------------------------------ structured output
class Address(BaseModel):
    street: str = Field(max_length=40)
    zip_code: str = Field(pattern=r"^[0-9]{5}$")


class Customer(BaseModel):
    name: str = Field(max_length=30)
    tier: Literal["free", "pro", "enterprise"]
    credits: int = Field(ge=0, le=1000)
    address: Address


def test_beta_parse_with_a_pydantic_model(client):
    for seed in range(4):
        r = client.beta.chat.completions.parse(
            model="default", messages=[{"role": "user", "content": "Create a customer record."}],
            response_format=Customer, max_tokens=160, seed=seed)
        assert r.choices[0].finish_reason == "stop"
        assert isinstance(r.choices[0].message.parsed, Customer)


SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 20},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 1, "maxItems": 3},
    "pet": {"anyOf": [{"type": "null"}, {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}},
                                         "required": ["kind"]}]}},
    "required": ["name", "age", "hobbies", "pet"]}


def test_json_schema_output_validates_over_many_seeds(client):
    """32 sampled outputs (4 requests of n=8; choice j of a request is seeded seed+j) and the greedy one."""
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    messages = [{"role": "user", "content": "Describe a person as JSON."}]
    outputs = []
    for seed in (0, 100, 200, 300):
        r = client.chat.completions.create(model="default", messages=messages, response_format=fmt, n=8, seed=seed,
                                           max_tokens=150)
        outputs += r.choices
    outputs += client.chat.completions.create(model="default", messages=messages, response_format=fmt, max_tokens=150,
                                              temperature=0).choices
    for c in outputs:
        assert c.finish_reason == "stop", c.message.content
        jsonschema.validate(json.loads(c.message.content), SCHEMA)
    assert len({c.message.content for c in outputs}) > 10  # sampled, not one answer repeated


def test_json_object_grammar_and_regex(client, server):
    ask = [{"role": "user", "content": 'A cat as a JSON object with two keys, "name" and "age".'}]
    r = client.chat.completions.create(model="default", messages=ask, response_format={"type": "json_object"},
                                       max_tokens=200, n=4, seed=0)
    for c in r.choices:  # any object may be long (a small model repeats keys): a finished one must parse
        text = c.message.content
        assert isinstance(json.loads(text), dict) if c.finish_reason == "stop" else text.startswith("{"), text
    assert "stop" in [c.finish_reason for c in r.choices]
    pattern = r"\(?[0-9]{3}\)? [0-9]{3}-[0-9]{4}"
    for seed in range(4):  # chat and completions both take the extensions
        r = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "A phone number?"}],
                                           max_tokens=30, seed=seed, extra_body={"regex": pattern})
        assert re.fullmatch(pattern, r.choices[0].message.content) and r.choices[0].finish_reason == "stop"
    gbnf = 'root ::= ("yes" | "no") " because " [a-z ]{3,40} "."'
    r = client.completions.create(model="default", prompt="Is the sky blue? Answer:", max_tokens=40, seed=5,
                                  extra_body={"grammar": gbnf})
    assert re.fullmatch(r"(yes|no) because [a-z ]{3,40}\.", r.choices[0].text), r.choices[0].text
    lark = 'start: "The answer is " NUMBER\nNUMBER: /[0-9]{1,3}/'
    r = client.completions.create(model="default", prompt="What is 6 times 7?", max_tokens=20, temperature=0,
                                  extra_body={"grammar": lark})
    assert re.fullmatch(r"The answer is [0-9]{1,3}", r.choices[0].text)


@pytest.mark.parametrize("payload, param, code", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "strict": True,
                                                                 "schema": {"type": "array", "uniqueItems": True}}}},
     "response_format", "invalid_json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format", "invalid_json_schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", None),
    ({"response_format": {"type": "xml"}}, "response_format", None),
    ({"regex": "(unclosed"}, "regex", "invalid_regex"),
    ({"grammar": "root ::= undefined_rule"}, "grammar", "invalid_grammar"),
    ({"regex": "a", "grammar": 'root ::= "a"'}, "regex", None),
    ({"logit_bias": {"99999999": 5}}, "logit_bias", None),
    ({"logit_bias": {"5": 500}}, "logit_bias", None),
    ({"logit_bias": {"hello": 5}}, "logit_bias", None),
])
def test_bad_constraints_are_400(server, payload, param, code):
    e = error_of(httpx.post(server.base + "/v1/chat/completions", json={"messages": ASK, **payload}), 400,
                 "invalid_request_error", param)
    if code:
        assert e["code"] == code


# ------------------------------------------------------------------------------ logit_bias
def test_logit_bias_bans_and_forces(client, llm):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    plain = llm.chat(messages, max_new_tokens=12, temperature=0)
    banned = plain.token_ids[:3]  # the words the model wants most
    r = client.chat.completions.create(model="default", messages=messages, max_tokens=12, temperature=0,
                                       logit_bias={str(t): -100 for t in banned}, logprobs=True)
    got = [bytes(c.bytes) for c in r.choices[0].logprobs.content]  # each token's bytes
    assert got and not set(got) & {llm.tokenizer.token_bytes(t) for t in banned}
    forced = llm.tokenizer.encode(" banana")[0]
    for seed in (1, 2, 3):
        r = client.completions.create(model="default", prompt="My favourite fruit is", max_tokens=5, seed=seed,
                                      logit_bias={str(forced): 100})
        assert r.choices[0].text == llm.tokenizer.decode([forced] * 5)


# ------------------------------------------------------------------------------ echo and prompt logprobs
@pytest.fixture(scope="module")
def float_server():
    s = Server("--ctx", "512", "--quantize", "none", "--dtype", "float32")
    yield s
    s.stop()


@pytest.mark.parametrize("path, tolerance", [("float", 1e-4), ("fast", 1e-4)])
def test_echo_logprobs_equal_log_softmax_of_the_logits(path, tolerance, request):
    """Prompt tokens' logprobs (the first null, as OpenAI) against log_softmax of the model's own forward pass
    on the same weights, on the exact float32 path and the default fast one.

    float (the GGUF dequantized, ``--quantize none``) and fast (Q4_1 blocks kept, a float32 cache): 1e-4,
    float32 sums in another order (the engine's paged prefill against ``Transformer.forward``, measured
    1.2e-5)."""
    server, llm = (request.getfixturevalue("float_server"), request.getfixturevalue("smollm2")) if path == "float" \
        else (request.getfixturevalue("server"), request.getfixturevalue("llm"))
    prompt = "The quick brown fox jumps over the lazy dog, and then it runs away into the forest."
    ids = llm.encode_prompt(prompt)
    with torch.inference_mode():
        ref = torch.log_softmax(llm.model(torch.tensor([ids]))[0].double(), dim=-1)
    expected = [float(ref[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    r = httpx.post(server.base + "/v1/completions", json={"prompt": prompt, "echo": True, "logprobs": 2,
                                                          "max_tokens": 0}, timeout=60).json()
    c = r["choices"][0]
    assert c["text"] == prompt and c["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 0
    lp = c["logprobs"]
    assert lp["tokens"] == [llm.tokenizer.decode([t]) for t in ids] and lp["token_logprobs"][0] is None
    assert lp["top_logprobs"][0] is None and all(len(t) == 2 for t in lp["top_logprobs"][1:])
    assert lp["token_logprobs"][1:] == pytest.approx(expected, abs=tolerance)
    for i in range(1, len(ids)):  # the alternatives: the reference's two most likely tokens
        assert list(lp["top_logprobs"][i].values()) == pytest.approx(torch.topk(ref[i - 1], 2).values.tolist(),
                                                                     abs=tolerance)
    assert [c["text"][o:o + len(t)] for o, t in zip(lp["text_offset"], lp["tokens"])] == lp["tokens"]


def test_echo_with_generation_and_text_offset(client, server, llm):
    prompt = "1, 2, 3, 4,"
    ref = llm.generate(prompt, max_new_tokens=6, temperature=0, logprobs=1)
    r = client.completions.create(model="default", prompt=prompt, echo=True, logprobs=1, max_tokens=6, temperature=0)
    c = r.choices[0]
    n = len(llm.encode_prompt(prompt))
    assert c.text == prompt + ref.text and r.usage.completion_tokens == len(c.logprobs.tokens) - n
    # the first new token's logits come from the scoring prefill's output rows (more than 8: the float GEMM
    # path) where plain generation projects the last row alone (int8 activations): 1e-2, as above; the
    # decode steps after it are the same computation (1e-4)
    assert c.logprobs.token_logprobs[n] == pytest.approx(ref.logprobs[0], abs=1e-2)
    assert c.logprobs.token_logprobs[n + 1:] == pytest.approx(ref.logprobs[1:], abs=1e-4)
    assert [c.text[o:o + len(t)] for o, t in zip(c.logprobs.text_offset, c.logprobs.tokens)] == c.logprobs.tokens
    plain = client.completions.create(model="default", prompt=prompt, logprobs=1, max_tokens=6, temperature=0)
    assert plain.choices[0].logprobs.text_offset == [o - len(prompt) for o in c.logprobs.text_offset[n:]]
    # streamed: the prompt first, then the tokens, text_offset running on across chunks
    s = list(client.completions.create(model="default", prompt=prompt, echo=True, logprobs=1, max_tokens=6,
                                       temperature=0, stream=True))
    assert "".join(x.choices[0].text for x in s) == c.text
    assert [o for x in s for o in x.choices[0].logprobs.text_offset] == c.logprobs.text_offset
    assert [v for x in s for v in x.choices[0].logprobs.token_logprobs] == c.logprobs.token_logprobs
    error_of(httpx.post(server.base + "/v1/completions", json={"prompt": "x", "max_tokens": 0}), 400,
             "invalid_request_error", "max_tokens")


# ------------------------------------------------------------------------------ models, embeddings, defaults
def test_model_by_id(client, server):
    m = client.models.retrieve("SmolLM2-135M-Instruct.Q4_1")
    assert m.id == "SmolLM2-135M-Instruct.Q4_1" and m.object == "model"
    from openai import NotFoundError

    with pytest.raises(NotFoundError):
        client.models.retrieve("gpt-4")
    error_of(httpx.get(server.base + "/v1/models/gpt-4"), 404, "not_found_error", "model")


def test_embeddings(client, server, llm):
    """Mean-pooled (default) or last-token final hidden states, unit length, as ``embed`` computes them on the
    same model (tolerance 1e-5: the same float32 computation, batched the same way)."""
    texts = ["The cat sat on the mat.", "Stock markets fell sharply today."]
    r = client.embeddings.create(model="default", input=texts)
    ref = embed(llm, texts)
    assert [d.index for d in r.data] == [0, 1] and r.model == "SmolLM2-135M-Instruct.Q4_1"
    torch.testing.assert_close(torch.tensor([d.embedding for d in r.data]), ref, rtol=0, atol=1e-5)
    n = sum(len(llm.encode_prompt(t)) for t in texts)
    assert r.usage.prompt_tokens == r.usage.total_tokens == n
    b64 = httpx.post(server.base + "/v1/embeddings", json={"input": texts[0], "encoding_format": "base64"}).json()
    vec = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_array_equal(vec, np.array(r.data[0].embedding, dtype=np.float32))
    ids = llm.encode_prompt(texts[1])
    last = httpx.post(server.base + "/v1/embeddings", json={"input": [ids], "pooling": "last"}).json()
    torch.testing.assert_close(torch.tensor(last["data"][0]["embedding"]), embed(llm, [ids], pooling="last")[0],
                               rtol=0, atol=1e-5)
    single_ids = httpx.post(server.base + "/v1/embeddings", json={"input": ids}).json()  # one list of token ids
    assert len(single_ids["data"]) == 1
    for payload, param in [({"input": ""}, "input"), ({"input": []}, None), ({"input": "x", "dimensions": 3},
                                                                             "dimensions"),
                           ({"input": "x", "encoding_format": "int8"}, "encoding_format")]:
        error_of(httpx.post(server.base + "/v1/embeddings", json=payload), 400, "invalid_request_error", param)


class _Defaults:
    temperature, top_p = 0.6, 0.9


def test_sampling_defaults():
    project = SamplingParams()
    assert sampling_defaults(object()) == {"temperature": project.temperature, "top_p": project.top_p,
                                           "top_k": project.top_k, "min_p": project.min_p,
                                           "repetition_penalty": project.repetition_penalty}
    for model in ({"temperature": 0.6, "top_p": 0.9}, _Defaults()):  # a mapping, or an object with the fields
        llm = type("L", (), {"sampling_defaults": model})()
        assert sampling_defaults(llm) == {**sampling_defaults(object()), "temperature": 0.6, "top_p": 0.9}


def test_omitted_sampling_fields_take_the_defaults(client, llm):
    """A request that names no sampling knob samples as the Python API does with the same seed (the same
    defaults), not with OpenAI's temperature 1 and top_p 1."""
    defaults = sampling_defaults(llm)
    r = client.completions.create(model="default", prompt="Once upon a time", max_tokens=16, seed=11)
    assert r.choices[0].text == llm.generate("Once upon a time", max_new_tokens=16, seed=11, **defaults).text


# ------------------------------------------------------------------------------ lm-evaluation-harness
def test_lm_eval_local_completions_gives_the_python_api_accuracy(float_server, smollm2, tmp_path, monkeypatch):
    """lm-eval's ``local-completions`` model (token-id prompts, echo, logprobs=1, max_tokens=1; the server's
    /tokenizer_info and /tokenize as its remote tokenizer) and the Python API's model class
    (``llama3.evaluate``) give the same accuracy on a local multiple-choice task, and the per-choice
    log-likelihoods agree within 1e-3, on the exact float path (the server's engine prefill against the
    model class's padded forward pass: float32 sums in another order). On the quantized path the two
    computations take different kernels (int8 activations for short prompts, a dequantized GEMM for
    padded batches), and a last-bit difference that crosses an int8 rounding step moves a choice's
    log-likelihood by up to ~0.4: there only the accuracy would be comparable."""
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is a test extra (pip install -e '.[test]')")
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.tasks import TaskManager

    from llama3.evaluate import lm_eval_model_class

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = tmp_path / "mc.jsonl"
    data.write_text("\n".join(json.dumps(ex) for ex in MC_TASK) + "\n")
    (tmp_path / "tiny_mc.yaml").write_text(f"""
task: tiny_mc_server
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
""")
    tasks = TaskManager(include_path=str(tmp_path))
    remote = LocalCompletionsAPI(base_url=float_server.base + "/v1/completions", model="SmolLM2-135M-Instruct.Q4_1",
                                 tokenizer_backend="remote", num_concurrent=1, max_retries=1, batch_size=4)
    local = lm_eval_model_class()(smollm2, batch_size=4)
    results = [lm_eval.simple_evaluate(model=m, tasks=["tiny_mc_server"], task_manager=tasks, log_samples=True)
               for m in (remote, local)]
    accs = [out["results"]["tiny_mc_server"]["acc,none"] for out in results]
    assert accs[0] == accs[1] > 0.5
    lls = [[r[0][0] for s in out["samples"]["tiny_mc_server"] for r in s["resps"]] for out in results]
    assert len(lls[0]) == sum(len(ex["choices"]) for ex in MC_TASK)
    assert lls[0] == pytest.approx(lls[1], abs=1e-3)
