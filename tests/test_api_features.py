"""The Python API's and the CLI's side of issue 14: constrained output, logit_bias and tool calls through
``Llama.generate/stream/chat``, sampling defaults read from checkpoints, and the command line's habits
(printf escapes, one-line errors with status 2, Ctrl-C, /help, the preset list, eval and perplexity,
labelled attention pictures)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch

from helpers import llama3_tokenizer_dir

from llama3 import Llama, ModelArgs, Transformer, load_tokenizer
from llama3.chat import Llama3ChatFormat
from llama3.cli import main, unescape
from llama3.sampling import FALLBACK_SAMPLING, SamplingParams, model_sampling_defaults
from llama3.structured import GrammarError, processors_for

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 30},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3}},
    "required": ["name", "age", "pets"]}
SUBJECTS = ["a baker", "a pilot", "a child", "a farmer", "a poet", "a nurse", "a chess player", "a sailor"]

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
SONGS = {"type": "function", "function": {
    "name": "trending_songs", "description": "The trending songs",
    "parameters": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 10}},
                   "required": ["n"]}}}
TOOLS = {"get_weather": WEATHER, "trending_songs": SONGS}


def run_cli(*args: str, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llama3.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env=ENV)


def one_error_line(out: subprocess.CompletedProcess, *, after_load: bool = False) -> str:
    """The process failed as a user error: status 2 and one line on stderr (after the line that says
    which default model is used, when it loaded one); returns that line."""
    lines = out.stderr.strip().splitlines()
    if after_load and lines and lines[0].startswith("using the embedded default model"):
        lines = lines[1:]
    assert out.returncode == 2, out.stderr
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    return lines[0]


# ------------------------------------------------------------------------ constrained output via Llama
def test_json_schema_outputs_validate_over_many_seeds(smollm2_fast):
    """Batched through Llama.generate (each prompt gets its own grammar), greedy and three seeds:
    32 outputs, every one finished and valid against the schema."""
    llm = smollm2_fast
    prompts = [llm.chat_prompt([{"role": "user", "content": f"Describe {s} as JSON: name, age, pets."}])[1]
               for s in SUBJECTS]
    for run in ({"temperature": 0}, {"seed": 1}, {"seed": 2}, {"seed": 3, "temperature": 1.2, "top_k": 0,
                                                                  "top_p": 1.0, "min_p": 0.0}):
        for r in llm.generate(prompts, json_schema=PERSON, max_new_tokens=80, **run):
            assert r.finish_reason == "stop", (run, r.text)
            jsonschema.validate(json.loads(r.text), PERSON)


def test_json_object_pydantic_regex_and_grammars(smollm2_fast):
    from pydantic import BaseModel, Field

    class City(BaseModel):
        name: str = Field(max_length=30)
        population: int = Field(ge=0, le=10**8)

    llm = smollm2_fast
    chat = [{"role": "user", "content": "Name a big city and its population, as JSON."}]
    for seed in range(4):
        r = llm.chat(chat, json_schema=City, seed=seed, max_new_tokens=60)
        City.model_validate_json(r.text)
        r = llm.chat(chat, json_object=True, seed=seed, max_new_tokens=80)
        assert r.finish_reason != "stop" or isinstance(json.loads(r.text), dict), r.text
        r = llm.generate("My phone number is", regex=r"\(?[0-9]{3}\)? [0-9]{3}-[0-9]{4}", seed=seed)
        assert re.fullmatch(r"\(?[0-9]{3}\)? [0-9]{3}-[0-9]{4}", r.text), r.text
        r = llm.generate("Is the sky blue?", grammar='root ::= ("yes" | "no") ", " [a-z ]{2,30} "."', seed=seed)
        assert re.fullmatch(r"(yes|no), [a-z ]{2,30}\.", r.text), r.text
        r = llm.generate("Pick a colour:", grammar='start: "red" | "green" | "blue"', seed=seed)  # Lark
        assert r.text in ("red", "green", "blue") and r.finish_reason == "stop"
    # streaming gives the same text, piece by piece
    pieces = [s.text for s in llm.stream("Count: ", regex=r"[0-9]( [0-9]){4}", temperature=0)]
    assert re.fullmatch(r"[0-9]( [0-9]){4}", "".join(pieces)) and len(pieces) > 1


def test_output_option_errors(smollm2_fast):
    llm = smollm2_fast
    with pytest.raises(ValueError, match="one output constraint"):
        llm.generate("x", regex="a+", json_object=True)
    with pytest.raises(GrammarError, match="regex"):
        llm.generate("x", regex="(unclosed")
    with pytest.raises(ValueError, match="logit_bias"):
        llm.generate("x", logit_bias={"not a token": 5})
    with pytest.raises(ValueError, match="needs tools"):
        llm.chat([{"role": "user", "content": "hi"}], tool_choice="required")
    with pytest.raises(ValueError, match="one output constraint"):
        processors_for(llm.tokenizer, json_object=True, tools=[WEATHER], tool_choice="required")
    assert processors_for(llm.tokenizer) == []


def test_logit_bias_bans_and_forces(smollm2_fast):
    llm = smollm2_fast
    prompt = "The capital of France is"
    paris = llm.tokenizer.encode(" Paris")[0]
    greedy = llm.generate(prompt, temperature=0, max_new_tokens=4)
    assert greedy.token_ids[0] == paris
    banned = llm.generate(prompt, temperature=0, max_new_tokens=4, logit_bias={paris: -100})
    assert paris not in banned.token_ids and banned.token_ids[0] != paris
    # a ban holds whatever the sampler does: 20 hot samples never pick it
    hot = llm.generate([prompt] * 20, seed=0, temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, max_new_tokens=1,
                       logit_bias={str(paris): -100})  # JSON-style string keys too
    assert all(paris not in r.token_ids for r in hot)
    banana = llm.tokenizer.encode(" banana")[0]
    forced = llm.generate(prompt, seed=0, max_new_tokens=3, logit_bias={banana: 100})
    assert forced.token_ids == [banana] * 3
    # the reported logprobs stay the model's own (the bias changes the choice, not the scores)
    assert forced.logprobs[0] < greedy.logprobs[0]


# ------------------------------------------------------------------------------------ tool calls
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "trending_songs"}}])
def test_chat_tool_choice_gives_parseable_calls(choice, smollm2_fast):
    llm = smollm2_fast
    messages = [{"role": "user", "content": "What's the weather in Paris, in celsius?"}]
    for run in ({"temperature": 0}, {"seed": 1}, {"seed": 2}, {"seed": 3}):
        r = llm.chat(messages, tools=[WEATHER, SONGS], tool_choice=choice, max_new_tokens=80, **run)
        assert r.finish_reason == "tool_calls" and len(r.tool_calls) == 1 and r.text == "", r
        call = r.tool_calls[0]
        assert call["type"] == "function" and call["id"].startswith("call_")
        name = call["function"]["name"]
        if isinstance(choice, dict):
            assert name == "trending_songs"
        jsonschema.validate(json.loads(call["function"]["arguments"]), TOOLS[name]["function"]["parameters"])


def test_stream_chat_with_tools_streams_the_same_call(smollm2_fast):
    from llama3.tools import ToolCallParser

    llm = smollm2_fast
    messages = [{"role": "user", "content": "Top 3 songs?"}]
    whole = llm.chat(messages, tools=[WEATHER, SONGS], tool_choice="required", temperature=0, max_new_tokens=60)
    parser, deltas = ToolCallParser(), []
    for step in llm.stream_chat(messages, tools=[WEATHER, SONGS], tool_choice="required", temperature=0,
                                max_new_tokens=60):
        deltas += parser.feed(step.text)
    deltas += parser.finish()
    assert [c.to_openai()["function"] for c in parser.calls] == [c["function"] for c in whole.tool_calls]
    assert "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas if "tool_calls" in d) == \
        whole.tool_calls[0]["function"]["arguments"]


def test_tool_results_fed_back_and_none(smollm2_fast):
    llm = smollm2_fast
    messages = [{"role": "user", "content": "What's the weather in Paris?"}]
    first = llm.chat(messages, tools=[WEATHER], tool_choice="required", temperature=0, max_new_tokens=60)
    messages += [{"role": "assistant", "content": None, "tool_calls": first.tool_calls},
                 {"role": "tool", "tool_call_id": first.tool_calls[0]["id"], "content": '{"temperature": 21}'}]
    second = llm.chat(messages, tools=[WEATHER], temperature=0, max_new_tokens=30)
    assert second.finish_reason in ("stop", "length", "tool_calls")
    plain = llm.chat(messages[:1], tools=[WEATHER], tool_choice="none", temperature=0, max_new_tokens=20)
    assert plain.tool_calls == [] and plain.finish_reason != "tool_calls"
    assert plain.prompt_tokens == len(llm.chat_prompt(messages[:1])[1])  # "none" renders no tools


@pytest.fixture(scope="module")
def random_llama3():
    """A tiny random model on Llama 3's real vocabulary and chat format (Meta's tool format): its
    output is noise, so only the constraint can make it call a tool."""
    torch.manual_seed(0)
    tokenizer = load_tokenizer(os.path.join(llama3_tokenizer_dir(), "tokenizer.model"))
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tokenizer.vocab_size,
                     max_seq_len=1024, ffn_hidden_dim=128)
    model = Transformer(args).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5 if p.ndim == 2 else 0.1).add_(1.0 if p.ndim == 1 else 0.0)
    return Llama(args, model, tokenizer, Llama3ChatFormat(tokenizer), path="random-llama3")


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_required_calls_from_a_random_model_in_meta_format(choice, random_llama3):
    llm = random_llama3
    messages = [{"role": "user", "content": "Weather in Oslo?"}]
    for seed in range(6):
        r = llm.chat(messages, tools=[WEATHER, SONGS], tool_choice=choice, seed=seed, max_new_tokens=200,
                     temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
        assert r.finish_reason == "tool_calls", r
        raw = llm.tokenizer.decode(r.token_ids)
        assert json.loads(raw).keys() == {"name", "parameters"}  # Meta's JSON call
        call = r.tool_calls[0]["function"]
        assert isinstance(choice, str) or call["name"] == "get_weather"
        jsonschema.validate(json.loads(call["arguments"]), TOOLS[call["name"]]["function"]["parameters"])


# ------------------------------------------------------------------------------ sampling defaults
def test_fallback_defaults_are_llama_cpps_and_sampling_params():
    assert FALLBACK_SAMPLING == {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05,
                                 "repetition_penalty": 1.0}
    d = SamplingParams()
    assert {k: getattr(d, k) for k in FALLBACK_SAMPLING} == FALLBACK_SAMPLING


def test_generation_config_defaults(tmp_path):
    assert model_sampling_defaults(tmp_path) == (FALLBACK_SAMPLING, "llama.cpp's defaults")
    config = tmp_path / "generation_config.json"
    # Llama 3.1 Instruct's generation_config.json (what Meta ships)
    config.write_text(json.dumps({"bos_token_id": 128000, "do_sample": True, "eos_token_id": [128001, 128008, 128009],
                                  "temperature": 0.6, "top_p": 0.9, "transformers_version": "4.42.3"}))
    values, source = model_sampling_defaults(tmp_path)
    assert values == {**FALLBACK_SAMPLING, "temperature": 0.6, "top_p": 0.9} and source == str(config)
    config.write_text(json.dumps({"top_k": 20, "min_p": 0, "repetition_penalty": 1.05, "temperature": 1}))
    values, _ = model_sampling_defaults(tmp_path)
    assert values == {**FALLBACK_SAMPLING, "top_k": 20, "min_p": 0.0, "repetition_penalty": 1.05, "temperature": 1.0}
    config.write_text(json.dumps({"do_sample": False, "temperature": 0.7}))  # transformers: greedy
    assert model_sampling_defaults(tmp_path)[0]["temperature"] == 0.0
    config.write_text(json.dumps({"top_p": 1.5}))
    with pytest.raises(ValueError, match=r"generation_config.json: top_p: top_p must be in \(0, 1\]"):
        model_sampling_defaults(tmp_path)
    config.write_text("{not json")
    with pytest.raises(ValueError, match="generation_config.json: not valid JSON"):
        model_sampling_defaults(tmp_path)


def write_header_only_gguf(path: Path, keys: dict) -> dict:
    """A GGUF file with these general.* keys written by gguf-py, read back by our header reader."""
    import gguf

    from llama3.weights.gguf import check_header

    w = gguf.GGUFWriter(str(path), "llama")
    for key, (value, vtype) in keys.items():
        w.add_key_value(key, value, vtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return check_header(str(path)).metadata


def test_gguf_sampling_keys(tmp_path):
    import gguf

    V = gguf.GGUFValueType
    K = gguf.Keys.General
    # the key names are gguf-py's own
    assert (K.SAMPLING_TEMP, K.SAMPLING_TOP_K, K.SAMPLING_TOP_P, K.SAMPLING_MIN_P, K.SAMPLING_PENALTY_REPEAT) == (
        "general.sampling.temp", "general.sampling.top_k", "general.sampling.top_p", "general.sampling.min_p",
        "general.sampling.penalty_repeat")
    path = tmp_path / "m.gguf"
    md = write_header_only_gguf(path, {K.SAMPLING_TEMP: (0.7, V.FLOAT32), K.SAMPLING_TOP_K: (20, V.INT32),
                                       K.SAMPLING_TOP_P: (0.8, V.FLOAT32), K.SAMPLING_MIN_P: (0.0, V.FLOAT32),
                                       K.SAMPLING_PENALTY_REPEAT: (1.1, V.FLOAT32)})
    values, source = model_sampling_defaults(path, md)
    assert values["top_k"] == 20 and values["min_p"] == 0.0 and "general.sampling" in source
    for name, want in (("temperature", 0.7), ("top_p", 0.8), ("repetition_penalty", 1.1)):
        assert values[name] == pytest.approx(want, abs=1e-6)  # stored as float32
    md = write_header_only_gguf(tmp_path / "partial.gguf", {K.SAMPLING_TEMP: (0.3, V.FLOAT32)})
    values, _ = model_sampling_defaults(tmp_path / "partial.gguf", md)
    assert values == {**FALLBACK_SAMPLING, "temperature": pytest.approx(0.3)}
    md = write_header_only_gguf(tmp_path / "bad.gguf", {K.SAMPLING_TOP_K: (-4, V.INT32)})
    with pytest.raises(ValueError, match="bad.gguf: general.sampling.top_k: top_k must be >= 0"):
        model_sampling_defaults(tmp_path / "bad.gguf", md)


def test_llama_fills_omitted_knobs_from_sampling_defaults(smollm2_fast, monkeypatch):
    llm = smollm2_fast
    assert llm.sampling_defaults == FALLBACK_SAMPLING and llm.sampling_defaults_source == "llama.cpp's defaults"
    greedy = llm.generate("Once upon a time", temperature=0, max_new_tokens=12)
    monkeypatch.setattr(llm, "sampling_defaults", {**FALLBACK_SAMPLING, "temperature": 0.0})
    assert llm.generate("Once upon a time", max_new_tokens=12).token_ids == greedy.token_ids
    sampled = llm.generate("Once upon a time", max_new_tokens=12, temperature=1.0, seed=5)  # a given knob wins
    monkeypatch.setattr(llm, "sampling_defaults", {**FALLBACK_SAMPLING, "temperature": 1.0})
    assert llm.generate("Once upon a time", max_new_tokens=12, seed=5).token_ids == sampled.token_ids


# ------------------------------------------------------------------------------------------ CLI
def test_unescape_equals_bashs_printf():
    cases = [r"Q: Why?\nA:", r"a\tb\\c", r"\x41\x7a", r"tab\x09end", r"\0101\0", r"quotes \" \' stay", r"bell\a\b\f\v\r",
             r"\e[0m", r"no \q escape", "trailing \\", r"\u00e9t\u00e9 \u263a", r"\U0001F600"]
    for text in cases:
        out = subprocess.run(["bash", "-c", 'printf "%b" "$1"', "_", text], capture_output=True, env={"LC_ALL": "C.UTF-8"})
        assert unescape(text).encode() == out.stdout, text
    assert unescape("日本 \\n") == "日本 \n"  # non-ASCII text passes through (no latin-1 round trip)
    assert unescape(r"\xe9") == "é"  # U+00E9 (printf would write a lone byte)
    with pytest.raises(ValueError, match="not a Unicode character"):
        unescape(r"\ud800")


def test_cli_escapes_in_prompt_and_stop():
    out = run_cli("generate", "-t", "0", "-n", "40", "--stop", r"\n", "Question: What is 2+2?\\nAnswer:")
    assert out.returncode == 0, out.stderr
    reference = run_cli("generate", "-t", "0", "-n", "40", "--raw", "--stop", "\n",
                        "Question: What is 2+2?\nAnswer:")
    assert out.stdout == reference.stdout and "\n" not in out.stdout.rstrip("\n")
    assert "finish: stop" in out.stderr


def test_cli_json_schema_and_grammar_files(tmp_path):
    schema = tmp_path / "person.json"
    schema.write_text(json.dumps(PERSON))
    out = run_cli("generate", "--seed", "3", "-n", "80", "--json-schema", str(schema), "A person, as JSON:")
    assert out.returncode == 0, out.stderr
    jsonschema.validate(json.loads(out.stdout), PERSON)
    grammar = tmp_path / "yn.lark"
    grammar.write_text('start: ("yes" | "no") "!"\n')
    out = run_cli("chat", "--seed", "1", "--grammar", str(grammar), stdin="Is water wet?\n")
    assert out.returncode == 0 and out.stdout.strip() in ("yes!", "no!"), out
    out = run_cli("generate", "--regex", "[0-9]{4}", "-t", "0", "The year:")
    assert out.returncode == 0 and re.fullmatch(r"[0-9]{4}", out.stdout.strip()), out


@pytest.mark.parametrize("args, message", [
    (["generate", "--temperature", "-1", "hi"], "temperature must be >= 0"),
    (["generate", "--bogus", "hi"], "unrecognized arguments: --bogus"),
    (["generate", "--regex", "a", "--json-object", "hi"], "not allowed with argument"),
    (["generate", "--json-schema", "/nonexistent/schema.json", "hi"], "--json-schema /nonexistent/schema.json: no such"),
    (["chat", "--top-p", "2"], "top_p must be in (0, 1]"),
    (["explain", "llama-9"], "presets: llama-3-8b, llama-3-70b"),
    (["perplexity", "/nonexistent.txt"], "/nonexistent.txt: no such file"),
    (["eval"], "give task files"),
])
def test_cli_user_errors_are_one_line_with_status_2(args, message, capsys):
    try:
        rc = main(args)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    out = capsys.readouterr()
    assert message in one_error_line(subprocess.CompletedProcess(args, rc, out.out, out.err))


def test_cli_user_error_in_a_process():
    line = one_error_line(run_cli("generate", "--top-k", "x"))
    assert line == "llama3 generate: error: argument --top-k: invalid int value: 'x' (see llama3 generate --help)"


def test_cli_errors_after_loading_are_one_line(tmp_path):
    device = "cuda:99" if torch.cuda.is_available() else "cuda"
    line = one_error_line(run_cli("generate", "--device", device, "hi"), after_load=True)
    assert line.startswith("llama3 generate: error: device cuda") and "--device cpu" in line
    bad = tmp_path / "bad.gbnf"
    bad.write_text('root ::= "a" | \n  nonsense ::= [\n')
    line = one_error_line(run_cli("generate", "--grammar", str(bad), "hi"), after_load=True)
    assert line.startswith("llama3 generate: error: grammar:")


def test_ctrl_c_while_torch_imports_is_one_line_and_130():
    """SIGINT while the command is still importing torch (well before the model loads)."""
    code = ("import sys; print('ready', flush=True); from llama3.cli import main; "
            "sys.exit(main(['generate', 'hello']))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.05)  # importing torch takes about a second: the signal comes in the middle of it
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip() == "llama3: interrupted" and "Traceback" not in err


def test_chat_help_lists_the_commands_and_goes_nowhere_else():
    out = run_cli("chat", "-t", "0", "-n", "8", stdin="/help\n/bogus\nHi\n/exit\nnot read\n")
    assert out.returncode == 0, out.stderr
    for command in ("/help", "/reset", "/history", "/system TEXT", "/exit"):
        assert command in out.stderr
    assert "unknown command /bogus" in out.stderr
    assert len(out.stdout.strip().splitlines()) == 1  # one reply: to "Hi" only
    assert "/help" in run_cli("chat", "--help").stdout


def test_help_states_the_sampling_defaults():
    for command in ("generate", "chat", "serve"):
        text = run_cli(command, "--help").stdout
        assert "generation_config.json" in text and "general.sampling" in text and "temperature 0.8" in text


def test_eval_and_perplexity_subcommands(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text((REPO / "README.md").read_text()[:6000])
    assert main(["perplexity", "--ctx", "64", "--chunks", "2", str(text)]) == 0
    out = capsys.readouterr().out
    ppl = float(re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ", out).group(1))
    assert 1 < ppl < 1000
    task = tmp_path / "mc.jsonl"
    task.write_text("\n".join(json.dumps(ex) for ex in [
        {"context": "Question: What is the capital of France?\nAnswer:", "choices": ["Paris", "Berlin"], "answer": 0},
        {"context": "Question: What do bees make?\nAnswer:", "choices": ["steel", "honey"], "answer": 1}]) + "\n")
    assert main(["eval", "--json", str(task)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert 0 <= report[str(task)]["acc"] <= 1


# ------------------------------------------------------------------------------ attention pictures
def test_attention_figures_have_token_labels_and_a_colour_bar():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llama3.explain.attention import grid_figure, head_figure

    tokens = ["<s>", "The", " cat", " sat", "\n", " mat"]
    n = len(tokens)
    rng = np.random.default_rng(0)
    probs = rng.random((5, n, n)) * np.tril(np.ones((n, n)))
    probs /= probs.sum(-1, keepdims=True)
    want = ["0:<s>", "1:The", "2: cat", "3: sat", "4:\\n", "5: mat"]

    def labels(ticks):
        return [t.get_text() for t in ticks]

    fig = head_figure(probs[0], tokens, layer=3, head=0)
    ax, bar = fig.axes
    assert labels(ax.get_xticklabels()) == want and labels(ax.get_yticklabels()) == want
    assert bar.get_ylabel() == "attention probability"
    plt.close(fig)

    fig = grid_figure(probs, tokens, layer=3)  # 5 heads: a 3 x 2 grid, one cell empty
    heads = [a for a in fig.axes if a.get_title().startswith("head ")]
    bars = [a for a in fig.axes if a.get_ylabel() == "attention probability"]
    assert len(heads) == 5 and len(bars) == 1
    assert all(h.images[0].norm.vmax == pytest.approx(probs.max()) for h in heads)  # one colour scale
    for i, h in enumerate(heads):
        left, bottom = i % 3 == 0, i + 3 >= 5
        assert labels(h.get_yticklabels()) == (want if left else [""] * n)
        assert labels(h.get_xticklabels()) == (want if bottom else [""] * n)
    plt.close(fig)
