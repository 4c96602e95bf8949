"""Generation on the real SmolLM2: against transformers' greedy generate, and the API's contracts."""

import subprocess
import sys

import pytest
import torch

import llama3

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,"]
GREEDY = dict(temperature=0)


def hf_greedy(hf, ids, n):
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0,
                          eos_token_id=[0, 2])
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_equals_transformers_through_generate_and_stream(smollm2, hf_smollm2, prompt):
    hf, _ = hf_smollm2
    ids = smollm2.encode_prompt(prompt)
    expected = hf_greedy(hf, ids, 24)
    result = smollm2.generate(prompt, max_new_tokens=24, **GREEDY)
    streamed = [s.token_id for s in smollm2.stream(prompt, max_new_tokens=24, **GREEDY)]
    stop_removed = [t for t in expected if t not in smollm2.tokenizer.stop_ids]
    assert result.token_ids == stop_removed
    assert streamed == expected
    assert result.text == smollm2.tokenizer.decode(stop_removed)
    assert result.prompt_tokens == len(ids) and result.completion_tokens == len(expected)


def test_greedy_cli_equals_transformers(smollm2, hf_smollm2):
    hf, _ = hf_smollm2
    prompt = PROMPTS[0]
    expected = smollm2.tokenizer.decode(hf_greedy(hf, smollm2.encode_prompt(prompt), 16))
    out = subprocess.run([sys.executable, "-m", "llama3.cli", "generate", "--temperature", "0", "--max-tokens", "16",
                          "--quantize", "none", prompt], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected + "\n"
    assert "generated" in out.stderr and "tok/s" in out.stderr


def test_prompt_from_stdin(smollm2):
    out = subprocess.run([sys.executable, "-m", "llama3.cli", "generate", "-t", "0", "-n", "8", "--quantize", "none"],
                         input=PROMPTS[0], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout == smollm2.generate(PROMPTS[0], max_new_tokens=8, **GREEDY).text + "\n"


def test_batch_equals_singles(smollm2):
    batch = smollm2.generate(PROMPTS, max_new_tokens=20, **GREEDY)
    assert [r.prompt_tokens for r in batch] == [len(smollm2.encode_prompt(p)) for p in PROMPTS]
    for prompt, result in zip(PROMPTS, batch):
        single = smollm2.generate(prompt, max_new_tokens=20, **GREEDY)
        assert result.token_ids == single.token_ids and result.text == single.text


def test_seeds(smollm2):
    kw = dict(max_new_tokens=20, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    a = smollm2.generate(PROMPTS[2], seed=1, **kw).text
    b = smollm2.generate(PROMPTS[2], seed=1, **kw).text
    c = smollm2.generate(PROMPTS[2], seed=2, **kw).text
    assert a == b and a != c


def test_stop_strings_and_finish_reasons(smollm2):
    full = smollm2.generate(PROMPTS[1], max_new_tokens=30, **GREEDY)
    assert full.finish_reason == "length" and full.completion_tokens == 30
    # a stop string taken from the middle of the greedy text, spanning several tokens
    target = full.text[5:12]
    cut = smollm2.generate(PROMPTS[1], max_new_tokens=30, stop=[target], **GREEDY)
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:full.text.index(target)]
    streamed = "".join(s.text for s in smollm2.stream(PROMPTS[1], max_new_tokens=30, stop=[target], **GREEDY))
    assert streamed == cut.text


def test_stop_token_ends_a_chat_turn(smollm2):
    r = smollm2.chat([{"role": "user", "content": "Say hello."}], max_new_tokens=200, **GREEDY)
    assert r.finish_reason == "stop" and r.completion_tokens < 200
    assert "<|im_end|>" not in r.text and 2 not in r.token_ids


def test_logprobs_agree_with_softmax(smollm2):
    ids = smollm2.encode_prompt(PROMPTS[0])
    steps = list(smollm2.stream(PROMPTS[0], max_new_tokens=3, logprobs=5, **GREEDY))
    with torch.no_grad():
        logits = smollm2.model(torch.tensor([ids + [s.token_id for s in steps[:-1]]]))[0, len(ids) - 1:]
    reference = torch.log_softmax(logits, dim=-1)
    for i, step in enumerate(steps):
        assert step.logprob == pytest.approx(float(reference[i, step.token_id]), abs=1e-4)
        top = torch.topk(reference[i], 5)
        assert list(step.top_logprobs) == top.indices.tolist()
        assert list(step.top_logprobs.values()) == pytest.approx(top.values.tolist(), abs=1e-4)
        assert step.token_id == top.indices[0]  # greedy picks the most likely


def test_prompt_longer_than_context(smollm2):
    small = llama3.Llama(smollm2.args, smollm2.model, smollm2.tokenizer, smollm2.chat_format, max_context=16)
    with pytest.raises(ValueError, match=r"the prompt has 20 tokens, but the context holds 16"):
        small.generate(list(range(20)), max_new_tokens=4)
    r = small.generate(list(range(10, 20)), max_new_tokens=50, **GREEDY)  # runs into the end of the context
    assert r.finish_reason == "length" and r.completion_tokens == 6


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1), "temperature must be >= 0"),
    (dict(top_p=0), "top_p must be in (0, 1]"),
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
])
def test_bad_parameters_from_api(smollm2, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        smollm2.generate("hi", **kwargs)


@pytest.mark.parametrize("args, message", [
    (["--temperature", "-1", "hi"], "temperature must be >= 0, got -1.0"),
    (["--top-p", "2", "hi"], "top_p must be in (0, 1], got 2.0"),
    (["--top-k", "-3", "hi"], "top_k must be >= 0"),
    (["--min-p", "7", "hi"], "min_p must be in [0, 1], got 7.0"),
    (["--max-tokens", "0", "hi"], "max_new_tokens must be >= 1, got 0"),
    (["--model", "/no/such/model.gguf", "hi"], "/no/such/model.gguf: no such file or directory"),
])
def test_bad_parameters_from_cli(args, message):
    out = subprocess.run([sys.executable, "-m", "llama3.cli", "generate"] + args, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert message in lines[-1] and "Traceback" not in out.stderr


def test_cli_prompt_too_long():
    out = subprocess.run([sys.executable, "-m", "llama3.cli", "generate", "--ctx", "8", "-n", "2",
                          "one two three four five six seven eight nine ten"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "but the context holds 8" in out.stderr and "Traceback" not in out.stderr


def test_help_has_examples():
    for cmd in ("generate", "chat"):
        out = subprocess.run([sys.executable, "-m", "llama3.cli", cmd, "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and "examples:" in out.stdout and "--temperature" in out.stdout


def test_penalties_change_greedy_output(smollm2):
    plain = smollm2.generate("1, 2, 1, 2, 1, 2,", max_new_tokens=12, **GREEDY)
    penalized = smollm2.generate("1, 2, 1, 2, 1, 2,", max_new_tokens=12, repetition_penalty=50.0, **GREEDY)
    assert plain.token_ids != penalized.token_ids
    prompt_ids = set(smollm2.encode_prompt("1, 2, 1, 2, 1, 2,"))
    # with a huge repetition penalty greedy decoding avoids every token already seen
    assert len(set(penalized.token_ids)) == len(penalized.token_ids)
    assert not prompt_ids & set(penalized.token_ids)
