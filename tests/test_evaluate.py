"""Evaluation and embeddings against plain references computed here.

References: ``log_softmax`` of the model's own full forward pass (``model(tokens)``), summed by a
plain loop; llama.cpp's perplexity windowing written out step by step. Tolerances: batching pads
rows and drops the output projection at unscored positions, which changes nothing but the order
of float32 sums, so results agree to ~1e-5 relative (well inside the issue's 1%).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch

import llama3
from llama3.embeddings import embed
from llama3.evaluate import (add_eval_parser, add_perplexity_parser, encode_pair, evaluate_task, final_hidden_states,
                             lm_eval_model_class, loglikelihood, loglikelihood_batch, min_rows, perplexity,
                             prompt_logprobs,
                             read_task)

REPO = Path(__file__).resolve().parents[1]


def reference_loglikelihood(model, context, continuation):
    """Sum of log p(continuation | context) from one full forward pass, and whether it is the argmax path."""
    ids = (context + continuation)[:-1]  # the last token predicts nothing that is scored
    # right-padded to min_rows positions, as scoring pads (padding after every real token changes nothing
    # causal attention lets them see), so quantized layers take the same path as scoring does
    tokens = torch.tensor([ids + [0] * max(0, min_rows(model) - len(ids))])
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(tokens)[0].double(), dim=-1)
    n = len(continuation)
    rows = logprobs[len(context) - 1:len(context) - 1 + n]
    target = torch.tensor(continuation)
    return float(rows.gather(-1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())


def reference_perplexity(model, tokens, ctx, bos_id=None):
    """llama.cpp's perplexity, written out: chunk, BOS first, score the second half, exp(mean NLL)."""
    nll, count = 0.0, 0
    for c in range(len(tokens) // ctx):
        chunk = tokens[c * ctx:(c + 1) * ctx]
        if bos_id is not None:
            chunk = [bos_id] + chunk[1:]
        with torch.inference_mode():
            logprobs = torch.log_softmax(model(torch.tensor([chunk]))[0].double(), dim=-1)
        for j in range(ctx // 2, ctx - 1):
            nll -= float(logprobs[j, chunk[j + 1]])
            count += 1
    return math.exp(nll / count), count


@pytest.fixture(scope="module")
def text_ids(smollm2):
    return smollm2.encode_prompt((REPO / "README.md").read_text())


# ------------------------------------------------------------------------------ hidden states
def test_final_hidden_states_are_what_the_output_projection_reads(smollm2):
    tokens = torch.tensor([smollm2.encode_prompt("The capital of France is Paris, and")])
    h = final_hidden_states(smollm2, tokens)
    assert h.shape == (1, tokens.shape[1], smollm2.args.dim)
    with torch.inference_mode():
        assert torch.equal(smollm2.model.output(h).float(), smollm2.model(tokens))


# ------------------------------------------------------------------------------ log-likelihoods
@pytest.mark.parametrize("fixture", ["smollm2", "smollm2_fast"])
def test_loglikelihood_equals_log_softmax_of_the_logits(fixture, request):
    llm = request.getfixturevalue(fixture)
    pairs = [encode_pair(llm, "Question: what is the capital of France? Answer: The capital of France is", " Paris"),
             encode_pair(llm, "At sea level, pure water boils at", " 100 degrees Celsius at sea level."),
             encode_pair(llm, "1, 2, 3, 4, 5, 6, 7,", " 8"),
             encode_pair(llm, "", "Once upon a time, in a land far away, there lived a king.")]
    batched = loglikelihood_batch(llm, pairs, batch_size=3)  # rows of different lengths, padded
    for (context, continuation), (lp, greedy) in zip(pairs, batched):
        ref_lp, ref_greedy = reference_loglikelihood(llm.model, context, continuation)
        assert lp == pytest.approx(ref_lp, rel=1e-5, abs=1e-4)
        assert greedy == ref_greedy
        assert loglikelihood(llm, context, continuation)[0] == pytest.approx(lp, rel=1e-6, abs=1e-5)


def test_greedy_flag(smollm2):
    context = smollm2.encode_prompt("One, two, three, four,")
    greedy = smollm2.generate(context, max_new_tokens=4, temperature=0).token_ids
    assert loglikelihood(smollm2, context, greedy)[1] is True
    other = greedy[:-1] + [(greedy[-1] + 1) % smollm2.tokenizer.vocab_size]
    assert loglikelihood(smollm2, context, other)[1] is False


def test_long_pairs_keep_their_last_tokens():
    args = llama3.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, max_seq_len=16)
    torch.manual_seed(0)
    model = llama3.Transformer(args).eval()
    context, continuation = list(range(1, 21)), [7, 8, 9]  # 23 tokens, window 16
    whole = (context + continuation)[-17:]  # 16 inputs predicting the last 16 tokens
    expected = reference_loglikelihood(model, whole[:-3], whole[-3:])
    assert loglikelihood(model, context, continuation)[0] == pytest.approx(expected[0], rel=1e-5)


def test_loglikelihood_rejects_empty_parts(smollm2):
    with pytest.raises(ValueError, match="request 0: the context is empty"):
        loglikelihood(smollm2, [], [5])
    with pytest.raises(ValueError, match="request 0: the continuation is empty"):
        loglikelihood(smollm2, [5], [])


def test_encode_pair_moves_trailing_spaces_and_splits_the_whole_encoding(smollm2):
    context, continuation = encode_pair(smollm2, "Answer: ", "yes")
    assert context + continuation == smollm2.encode_prompt("Answer: yes")
    assert smollm2.tokenizer.decode(continuation) == " yes"


@pytest.mark.parametrize("fixture", ["smollm2", "smollm2_fast"])
def test_prompt_logprobs_equal_log_softmax_of_the_logits(fixture, request):
    llm = request.getfixturevalue(fixture)
    ids = llm.encode_prompt("The capital of France is Paris. The capital of Italy is Rome.")
    got = prompt_logprobs(llm, ids, top=3, chunk=5)  # several chunks
    padded = ids[:-1] + [0] * max(0, min_rows(llm.model) - len(ids) + 1)  # as scoring pads (see above)
    with torch.inference_mode():
        ref = torch.log_softmax(llm.model(torch.tensor([padded]))[0].double(), dim=-1)
    assert got[0] == (None, {}) and len(got) == len(ids)
    for i, (lp, top) in enumerate(got[1:]):
        assert lp == pytest.approx(float(ref[i, ids[i + 1]]), abs=1e-4)
        values, indices = torch.topk(ref[i], 3)
        assert list(top) == indices.tolist()
        assert list(top.values()) == pytest.approx(values.tolist(), abs=1e-4)
    assert prompt_logprobs(llm, ids[:1]) == [(None, {})]
    with pytest.raises(ValueError, match="the prompt is empty"):
        prompt_logprobs(llm, [])


# ------------------------------------------------------------------------------ perplexity
@pytest.mark.parametrize("bos", [None, 1])
def test_perplexity_equals_the_reference_loop(smollm2, text_ids, bos):
    ctx = 64
    tokens = text_ids[:5 * ctx + 17]  # 5 chunks and a remainder that is not scored
    ref, count = reference_perplexity(smollm2.model, tokens, ctx, bos)
    result = perplexity(smollm2, tokens, ctx, bos_id=bos, batch_size=2)
    assert result.chunks == 5 and result.tokens_scored == count == 5 * (ctx - 1 - ctx // 2)
    assert result.ppl == pytest.approx(ref, rel=1e-5)
    assert result.running_ppl[-1] == pytest.approx(result.ppl) and len(result.running_ppl) == 5
    assert 0 < result.std_error < result.ppl
    assert perplexity(smollm2, tokens, ctx, bos_id=bos, n_chunks=2).ppl == \
        pytest.approx(reference_perplexity(smollm2.model, tokens[:2 * ctx], ctx, bos)[0], rel=1e-5)


def test_perplexity_errors(smollm2, text_ids):
    with pytest.raises(ValueError, match="needs at least 1024"):
        perplexity(smollm2, text_ids[:1000], 512)
    with pytest.raises(ValueError, match="ctx must be at least 4"):
        perplexity(smollm2, text_ids, 2)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        perplexity(smollm2, text_ids, 10**6)


def test_perplexity_command(smollm2, tmp_path, capsys):
    text = (REPO / "README.md").read_text()
    path = tmp_path / "text.txt"
    path.write_text(text)
    parser = argparse.ArgumentParser(prog="llama3")
    sub = parser.add_subparsers(dest="command")
    add_perplexity_parser(sub)
    ns = parser.parse_args(["perplexity", "--ctx", "64", "--chunks", "3", "--quantize", "none", str(path)])
    assert ns.func(ns) == 0
    out = capsys.readouterr()
    expected = perplexity(smollm2, smollm2.encode_prompt(text), 64, n_chunks=3)
    assert out.out.strip() == f"Final estimate: PPL = {expected.ppl:.4f} +/- {expected.std_error:.5f}"
    assert "[1]" in out.err and "[3]" in out.err
    help_text = sub.choices["perplexity"].format_help()
    assert "llama3 perplexity wiki.test.raw" in help_text and "tokens per chunk (default: 512" in help_text


# ------------------------------------------------------------------------------ task files
MC_TASK = [
    {"context": "Question: What is the capital of France?\nAnswer:", "choices": ["Paris", "Berlin", "Madrid"],
     "answer": 0},
    {"context": "Question: How many legs does a dog have?\nAnswer:", "choices": ["two", "four", "six"], "answer": 1},
    {"context": "Question: What color is the sky on a clear day?\nAnswer:", "choices": ["green", "red", "blue"],
     "answer": 2},
    {"context": "Question: What do bees make?\nAnswer:", "choices": ["honey", "milk", "steel"], "answer": 0},
    {"context": "Question: Which number is the largest?\nAnswer:", "choices": ["3", "12", "7"], "answer": 1},
    {"context": "Question: What is frozen water called?\nAnswer:", "choices": ["steam", "ice", "sand"], "answer": 1},
]


@pytest.fixture()
def mc_file(tmp_path):
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join(json.dumps(ex) for ex in MC_TASK) + "\n")
    return path


def direct_accuracy(llm, examples):
    right = 0
    for ex in examples:
        lls = [loglikelihood(llm, *encode_pair(llm, ex["context"], " " + c))[0] for c in ex["choices"]]
        right += max(range(len(lls)), key=lls.__getitem__) == ex["answer"]
    return right / len(examples)


def test_multiple_choice_task_file(smollm2, mc_file):
    result = evaluate_task(smollm2, mc_file, batch_size=4)
    assert result.kind == "multiple_choice" and result.n == len(MC_TASK)
    assert result.metrics["acc"] == direct_accuracy(smollm2, MC_TASK)
    assert result.metrics["acc"] > 0.5  # the model knows these


def test_generate_until_task_file(smollm2, tmp_path):
    path = tmp_path / "gen.jsonl"
    examples = [{"prompt": "1, 2, 3, 4,", "target": "5", "until": [","]},
                {"prompt": "Monday, Tuesday,", "target": "Wednesday", "until": [","]},
                {"prompt": "a, b, c, d,", "target": "z", "until": [","]}]
    path.write_text("\n".join(json.dumps(ex) for ex in examples))
    answers = [smollm2.generate(ex["prompt"], temperature=0, max_new_tokens=64, stop=[","]).text.strip()
               for ex in examples]
    result = evaluate_task(smollm2, path)
    assert result.kind == "generate_until" and result.n == 3
    assert result.metrics["exact_match"] == sum(a == ex["target"] for a, ex in zip(answers, examples)) / 3
    assert answers[0] == "5" and answers[2] != "z"  # a right and a wrong answer are both counted


@pytest.mark.parametrize("lines, message", [
    (['{"context": "x", "choices": ["a"], "answer": 0}'], r"mc.jsonl:1: a multiple-choice line needs"),
    (['{"context": "x", "choices": ["a", "b"], "answer": 2}'], r"mc.jsonl:1: \"answer\" must be the index"),
    (['{"prompt": "x"}'], r"mc.jsonl:1: a generate-until line needs"),
    (["", "not json"], r"mc.jsonl:2: not JSON"),
    (['{"question": "x"}'], r"mc.jsonl:1: a line needs \"choices\""),
    (['{"context": "x", "choices": ["a", "b"], "answer": 0}', '{"prompt": "x", "target": "y"}'], "mixes"),
    ([""], "has no examples"),
])
def test_task_file_errors(tmp_path, lines, message):
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join(lines))
    with pytest.raises(ValueError, match=message):
        read_task(path)


def test_lm_eval_harness_gives_the_direct_accuracy(smollm2, mc_file, tmp_path, monkeypatch, capsys):
    """lm-evaluation-harness runs a local multiple-choice task through our model class."""
    pytest.importorskip("lm_eval", reason="lm-eval is a test extra (pip install -e '.[test]')")
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    (tmp_path / "tiny_mc.yaml").write_text(f"""
task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {mc_file}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
""")
    model = lm_eval_model_class()(smollm2, batch_size=4)
    out = lm_eval.simple_evaluate(model=model, tasks=["tiny_mc"], task_manager=TaskManager(include_path=str(tmp_path)))
    direct = direct_accuracy(smollm2, MC_TASK)
    assert out["results"]["tiny_mc"]["acc,none"] == direct
    # the same through `llama3 eval --tasks`
    parser = argparse.ArgumentParser(prog="llama3")
    add_eval_parser(parser.add_subparsers(dest="command"))
    ns = parser.parse_args(["eval", "--tasks", "tiny_mc", "--include-path", str(tmp_path), "--json",
                            "--quantize", "none"])
    assert ns.func(ns) == 0
    assert json.loads(capsys.readouterr().out)["tiny_mc"]["acc,none"] == direct
    ns = parser.parse_args(["eval", "--tasks", "no_such_task", "--include-path", str(tmp_path)])
    with pytest.raises(ValueError, match="unknown lm-eval task"):
        ns.func(ns)


def test_lm_eval_rolling_and_generate(smollm2):
    pytest.importorskip("lm_eval", reason="lm-eval is a test extra (pip install -e '.[test]')")
    from lm_eval.api.instance import Instance

    model = lm_eval_model_class()(smollm2)
    text = "The quick brown fox jumps over the lazy dog."
    rolling = model.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])[0]
    ids = smollm2.tokenizer.encode(text)
    prefix = smollm2.tokenizer.bos_id if smollm2.tokenizer.bos_id is not None else smollm2.tokenizer.eos_id
    assert rolling == pytest.approx(reference_loglikelihood(smollm2.model, [prefix], ids)[0], rel=1e-5)
    out = model.generate_until([Instance("generate_until", {}, ("1, 2, 3,", {"until": [","], "max_gen_toks": 8}), 0)])
    assert out == [smollm2.generate("1, 2, 3,", temperature=0, max_new_tokens=8, stop=[","]).text]


def test_eval_command_on_a_task_file(smollm2, mc_file, capsys):
    parser = argparse.ArgumentParser(prog="llama3")
    sub = parser.add_subparsers(dest="command")
    add_eval_parser(sub)
    ns = parser.parse_args(["eval", "--json", "--quantize", "none", str(mc_file)])
    assert ns.func(ns) == 0
    report = json.loads(capsys.readouterr().out)
    assert report[str(mc_file)]["acc"] == direct_accuracy(smollm2, MC_TASK)
    with pytest.raises(ValueError, match="give task files"):
        ns = parser.parse_args(["eval"])
        ns.func(ns)


# ------------------------------------------------------------------------------ embeddings
def test_embeddings_pool_the_final_hidden_states(smollm2):
    texts = ["The cat sat on the mat.", "Hi", "Stock markets fell sharply today after the announcement."]
    mean = embed(smollm2, texts, pooling="mean", normalize=False, batch_size=2)
    last = embed(smollm2, texts, pooling="last", normalize=False)
    assert mean.shape == (3, smollm2.args.dim) and mean.dtype == torch.float32
    for i, t in enumerate(texts):  # each text alone, unpadded
        h = final_hidden_states(smollm2, torch.tensor([smollm2.encode_prompt(t)]))[0].float()
        torch.testing.assert_close(mean[i], h.mean(0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(last[i], h[-1], rtol=1e-4, atol=1e-5)
    unit = embed(smollm2, texts)
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(unit, torch.nn.functional.normalize(mean, dim=-1))


def test_embedding_errors(smollm2):
    with pytest.raises(ValueError, match="pooling must be one of mean, last"):
        embed(smollm2, ["x"], pooling="max")
    with pytest.raises(ValueError, match="input 0 is empty"):
        embed(smollm2, [""])
    ctx = smollm2.generator.context
    with pytest.raises(ValueError, match=f"input 1 has {ctx + 1} tokens, more than the context of {ctx}"):
        embed(smollm2, ["fine", [5] * (ctx + 1)])
