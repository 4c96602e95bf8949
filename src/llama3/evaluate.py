"""Evaluation: log-likelihoods, llama.cpp's perplexity, local task files, and lm-evaluation-harness.

    from llama3.evaluate import loglikelihood, perplexity
    llm = llama3.load()
    lp, greedy = loglikelihood(llm, llm.encode_prompt("The capital of France is"), llm.tokenizer.encode(" Paris"))
    result = perplexity(llm, llm.encode_prompt(open("wiki.test.raw").read()), ctx=512)
    print(result)      # PPL = ... +/- ... over N chunks of 512 tokens (... tokens scored)

``prompt_logprobs(llm, ids, top=5)`` gives each prompt token's logprob and the top alternatives (what
``echo`` with ``logprobs`` returns). Everything runs plain forward passes from position 0 without a KV
cache (each window is causal on its own), and computes the output projection only at the positions
that are scored.

Faces: ``llama3 perplexity FILE`` (llama.cpp's numbers, to compare quantizations by), ``llama3 eval
FILE.jsonl`` (multiple-choice and generate-until tasks from a local JSON-lines file), ``llama3 eval
--tasks NAME`` (lm-evaluation-harness tasks through the "llama3" model class, when ``lm-eval`` is
installed).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from .model import Transformer, rope_angles
from .quantize import PREFILL_ANY_ROWS, QuantLinear


# ------------------------------------------------------------------------------ forward passes
def _transformer(model) -> Transformer:
    """A Transformer, given one or a loaded ``Llama``."""
    return getattr(model, "model", model)


def _max_length(model) -> int:
    """The longest window: the Llama's context (``max_context``) if given one, else the model's."""
    generator = getattr(model, "generator", None)
    return generator.context if generator is not None else _transformer(model).args.max_seq_len


@torch.inference_mode()
def final_hidden_states(model, tokens: torch.Tensor) -> torch.Tensor:
    """The last block's output after the final RMSNorm, (batch, seq, dim) in the model's dtype: what the
    output projection reads. One causal pass from position 0 without a cache, as ``Transformer.forward``
    runs it, minus the output projection (so ``model.output(h)`` gives its logits)."""
    m = _transformer(model)
    tokens = tokens.to(m.norm.weight.device)
    cos, sin = rope_angles(m.rope_freqs, torch.arange(tokens.shape[1], device=tokens.device)[None])
    h = m.tok_embeddings(tokens)  # (batch, seq, dim)
    for layer in m.layers:
        h = layer(h, cos, sin, None)  # no mask and no cache: plain causal attention
    return m.norm(h)


def min_rows(model) -> int:
    """Quantized layers (llama3.quantize.QuantLinear) run inputs of at most ``kernel_rows`` rows through the
    block kernels (each row on its own) and larger ones through a dequantized GEMM. Where that bound is
    finite, scoring always feeds more rows than it, so a request's score never depends on what it is
    batched with; where the kernels run every length (1), it cannot anyway."""
    rows = [m.kernel_rows for m in _transformer(model).modules() if isinstance(m, QuantLinear)]
    return max(rows) + 1 if rows and max(rows) < PREFILL_ANY_ROWS else 1


def _logprobs_at(model, h: torch.Tensor) -> torch.Tensor:
    """log_softmax of the logits for hidden states h (n, dim), float32 on the CPU."""
    n, least = h.shape[0], min_rows(model)
    if n < least:
        h = torch.cat([h, h.new_zeros(least - n, h.shape[1])])
    return torch.log_softmax(_transformer(model).output(h)[:n].float(), dim=-1).cpu()


def _padded(rows: Sequence[Sequence[int]], least: int = 1) -> torch.Tensor:
    """Rows right-padded with token 0 into (batch, longest): padding comes after every real token, so
    causal attention never lets a real position see it (at least ``least`` positions: ``min_rows``)."""
    longest = max(least, max(len(r) for r in rows))
    return torch.tensor([list(r) + [0] * (longest - len(r)) for r in rows], dtype=torch.long)


# ------------------------------------------------------------------------------ log-likelihoods
def loglikelihood(model, context_ids: Sequence[int], continuation_ids: Sequence[int]) -> tuple[float, bool]:
    """(sum of log p(continuation | context), whether greedy decoding would produce the continuation).

    ``model`` is a ``Llama`` (``llama3.load()``) or a ``Transformer``. Too long a pair keeps its last
    tokens (the context is cut from the left), as lm-evaluation-harness does."""
    return loglikelihood_batch(model, [(context_ids, continuation_ids)])[0]


@torch.inference_mode()
def loglikelihood_batch(model, requests: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 8,
                        progress: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
    """``loglikelihood`` for many (context ids, continuation ids) pairs, batched (results in order)."""
    m, limit = _transformer(model), _max_length(model)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prepared = []  # (input ids, number of scored positions, target ids)
    for i, (context, continuation) in enumerate(requests):
        context, continuation = list(context), list(continuation)
        if not context:
            raise ValueError(f"request {i}: the context is empty; start it with BOS (or EOS) at least")
        if not continuation:
            raise ValueError(f"request {i}: the continuation is empty")
        whole = (context + continuation)[-(limit + 1):]
        n = min(len(continuation), len(whole) - 1)
        prepared.append((whole[:-1], n, whole[-n:]))
    order = sorted(range(len(prepared)), key=lambda k: -len(prepared[k][0]))  # similar lengths batch together
    results: list[tuple[float, bool] | None] = [None] * len(prepared)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        h = final_hidden_states(m, _padded([prepared[k][0] for k in chunk], min_rows(m)))
        # the last n real positions of each row predict its n continuation tokens
        rows = [h[j, len(prepared[k][0]) - prepared[k][1]:len(prepared[k][0])] for j, k in enumerate(chunk)]
        logprobs = _logprobs_at(m, torch.cat(rows))
        offset = 0
        for k in chunk:
            n, targets = prepared[k][1], torch.tensor(prepared[k][2])
            lp = logprobs[offset:offset + n]
            offset += n
            results[k] = (float(lp.gather(-1, targets[:, None]).sum()), bool((lp.argmax(-1) == targets).all()))
        if progress:
            progress(len(chunk))
    return results


@torch.inference_mode()
def prompt_logprobs(model, token_ids: Sequence[int], top: int = 0,
                    chunk: int = 256) -> list[tuple[float | None, dict[int, float]]]:
    """For each token of a prompt, (log p(token | the tokens before it), the ``top`` most likely tokens
    there as {id: logprob}); the first token has (None, {}). What ``echo`` with ``logprobs`` reports."""
    m = _transformer(model)
    ids = list(token_ids)
    if not ids:
        raise ValueError("the prompt is empty")
    if len(ids) > _max_length(model):
        raise ValueError(f"the prompt has {len(ids)} tokens, more than the context of {_max_length(model)}")
    if not 0 <= top <= 20:
        raise ValueError(f"top must be in [0, 20], got {top}")
    out: list[tuple[float | None, dict[int, float]]] = [(None, {})]
    if len(ids) == 1:
        return out
    h = final_hidden_states(m, _padded([ids[:-1]], min_rows(m)))[0, :len(ids) - 1]  # position i predicts token i + 1
    for start in range(0, h.shape[0], chunk):  # (chunk, vocab) logprobs at a time, not (seq, vocab)
        logprobs = _logprobs_at(m, h[start:start + chunk])
        targets = torch.tensor(ids[start + 1:start + 1 + logprobs.shape[0]])
        chosen = logprobs.gather(-1, targets[:, None])[:, 0]
        tops = torch.topk(logprobs, top) if top else None
        for r in range(logprobs.shape[0]):
            alternatives = {int(i): float(v) for i, v in zip(tops.indices[r], tops.values[r])} if top else {}
            out.append((float(chosen[r]), alternatives))
    return out


# ------------------------------------------------------------------------------ perplexity
@dataclass
class PerplexityResult:
    ppl: float  # exp(mean negative log-likelihood)
    std_error: float  # of the PPL, from the spread of the per-token NLLs (llama.cpp's estimate)
    nll: float  # mean negative log-likelihood, nats per token
    tokens_scored: int
    chunks: int
    ctx: int
    running_ppl: list[float] = field(default_factory=list)  # after each chunk, as llama.cpp prints them

    def __str__(self) -> str:
        return f"PPL = {self.ppl:.4f} +/- {self.std_error:.5f} over {self.chunks} chunks of {self.ctx} tokens " \
               f"({self.tokens_scored} tokens scored)"


@torch.inference_mode()
def perplexity(model, token_ids: Sequence[int], ctx: int = 512, *, bos_id: int | None = None,
               n_chunks: int | None = None, batch_size: int = 1,
               progress: Callable[[int, float], None] | None = None) -> PerplexityResult:
    """Perplexity with llama.cpp's ``llama-perplexity`` windowing (tools/perplexity/perplexity.cpp).

    The tokens are cut into ``len // ctx`` chunks of ``ctx`` tokens, each run on its own from
    position 0; when ``bos_id`` is given (the vocabulary adds BOS) the first token of every chunk is
    replaced by BOS. Only the second half of each chunk is scored, so every scored token has at least
    ctx/2 tokens of context: positions ctx/2 .. ctx-2 predict tokens ctx/2+1 .. ctx-1. Give the ids of
    the whole text as ``llm.encode_prompt`` makes them (BOS first when the tokenizer adds one).
    ``progress(chunk_index, running_ppl)`` is called after each chunk.
    """
    m = _transformer(model)
    tokens = list(token_ids)
    if ctx < 4:
        raise ValueError(f"ctx must be at least 4, got {ctx}")
    if ctx > _max_length(model):
        raise ValueError(f"ctx {ctx} exceeds the model's context of {_max_length(model)}")
    if len(tokens) < 2 * ctx:
        raise ValueError(f"the text has {len(tokens)} tokens; perplexity with ctx {ctx} needs at least {2 * ctx} "
                         f"(give a longer text or a smaller --ctx)")
    chunks = len(tokens) // ctx
    if n_chunks is not None:
        if n_chunks < 1:
            raise ValueError(f"n_chunks must be >= 1, got {n_chunks}")
        chunks = min(chunks, n_chunks)
    first = ctx // 2
    nll = nll2 = 0.0
    count = 0
    running = []
    for c0 in range(0, chunks, batch_size):
        windows = [tokens[c * ctx:(c + 1) * ctx] for c in range(c0, min(c0 + batch_size, chunks))]
        if bos_id is not None:
            windows = [[bos_id] + w[1:] for w in windows]
        batch = torch.tensor(windows, dtype=torch.long)
        h = final_hidden_states(m, batch)[:, first:ctx - 1]  # (chunks, ctx - 1 - first, dim)
        logprobs = _logprobs_at(m, h.reshape(-1, h.shape[-1])).view(len(windows), ctx - 1 - first, -1)
        targets = batch[:, first + 1:]
        token_nll = -logprobs.gather(-1, targets[..., None])[..., 0].double()  # (chunks, ctx - 1 - first)
        for row in token_nll:
            nll += float(row.sum())
            nll2 += float((row * row).sum())
            count += row.numel()
            running.append(math.exp(nll / count))
            if progress:
                progress(len(running), running[-1])
    mean = nll / count
    variance = nll2 / count - mean * mean
    # llama.cpp: the standard error of the mean NLL, carried to the PPL by d(e^x) = e^x dx
    std = math.sqrt(variance / (count - 1)) if variance > 0 and count > 1 else 0.0
    ppl = math.exp(mean)
    return PerplexityResult(ppl, std * ppl, mean, count, chunks, ctx, running)


# ------------------------------------------------------------------------------ local task files
def encode_pair(llm, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of a (context, continuation) text pair as lm-evaluation-harness splits them: the pair is
    encoded whole (so the tokens at the seam are the ones the model would see) and the context's
    tokens are cut off the front; trailing spaces of the context move to the continuation. The context
    starts with BOS where the tokenizer adds one; an empty context is just BOS (or EOS)."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    tok = llm.tokenizer
    prefix = tok.bos_id if tok.bos_id is not None else tok.eos_id
    if not context:
        return [prefix], tok.encode(continuation)
    whole = llm.encode_prompt(context + continuation)
    context_ids = llm.encode_prompt(context)
    return context_ids, whole[len(context_ids):]


@dataclass
class TaskResult:
    path: str
    kind: str  # "multiple_choice" | "generate_until"
    n: int
    metrics: dict[str, float]

    def __str__(self) -> str:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in self.metrics.items())
        return f"{self.path}: {self.kind}, {self.n} examples: {shown}"


def read_task(path: str | Path) -> tuple[str, list[dict]]:
    """The examples of a JSON-lines task file and its kind; a bad line raises ValueError naming it.

    multiple choice: {"context": "Q: ...\\nA:", "choices": ["Paris", "Rome"], "answer": 0}
    generate until:  {"prompt": "Q: ...\\nA:", "target": "Paris", "until": ["\\n"]}  ("until" optional)
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    examples, kinds = [], set()
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            ex = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}:{i}: not JSON: {e}") from None
        if not isinstance(ex, dict):
            raise ValueError(f"{path}:{i}: each line must be a JSON object")
        if "choices" in ex:
            choices, answer = ex.get("choices"), ex.get("answer")
            if not isinstance(ex.get("context"), str) or not isinstance(choices, list) or len(choices) < 2 \
                    or not all(isinstance(c, str) and c for c in choices):
                raise ValueError(f"{path}:{i}: a multiple-choice line needs \"context\" (a string) and \"choices\" "
                                 "(two or more non-empty strings)")
            if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
                raise ValueError(f"{path}:{i}: \"answer\" must be the index of the right choice "
                                 f"(0..{len(choices) - 1})")
            kinds.add("multiple_choice")
        elif "prompt" in ex:
            until = ex.get("until", ["\n"])
            if not isinstance(ex["prompt"], str) or not isinstance(ex.get("target"), str) \
                    or not isinstance(until, list) or not all(isinstance(u, str) and u for u in until):
                raise ValueError(f"{path}:{i}: a generate-until line needs \"prompt\" and \"target\" strings and "
                                 "optionally \"until\" (non-empty stop strings)")
            kinds.add("generate_until")
        else:
            raise ValueError(f"{path}:{i}: a line needs \"choices\" (multiple choice) or \"prompt\" (generate until)")
        examples.append(ex)
    if not examples:
        raise ValueError(f"{path}: the file has no examples")
    if len(kinds) > 1:
        raise ValueError(f"{path}: mixes multiple-choice and generate-until lines; use one kind per file")
    return kinds.pop(), examples


def evaluate_task(llm, path: str | Path, *, limit: int | None = None, batch_size: int = 8,
                  max_new_tokens: int = 64) -> TaskResult:
    """Score a local task file (see ``read_task``).

    Multiple choice: each choice's log-likelihood after the context (with a space between them, as
    lm-evaluation-harness's default target delimiter); ``acc`` takes the most likely choice,
    ``acc_norm`` the most likely per character of the choice. Generate until: greedy generation up
    to the first stop string; ``exact_match`` compares with the target, both stripped.
    """
    kind, examples = read_task(path)
    examples = examples[:limit] if limit else examples
    if kind == "multiple_choice":
        pairs = [encode_pair(llm, ex["context"], " " + c) for ex in examples for c in ex["choices"]]
        scores = iter(loglikelihood_batch(llm, pairs, batch_size=batch_size))
        acc = acc_norm = 0
        for ex in examples:
            lls = [next(scores)[0] for _ in ex["choices"]]
            acc += _argmax(lls) == ex["answer"]
            acc_norm += _argmax([ll / len(c) for ll, c in zip(lls, ex["choices"])]) == ex["answer"]
        metrics = {"acc": acc / len(examples), "acc_norm": acc_norm / len(examples)}
    else:
        hits = 0
        for ex in examples:
            out = llm.generate(ex["prompt"], max_new_tokens=max_new_tokens, temperature=0,
                               stop=ex.get("until", ["\n"]))
            hits += out.text.strip() == ex["target"].strip()
        metrics = {"exact_match": hits / len(examples)}
    return TaskResult(str(path), kind, len(examples), metrics)


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


# ------------------------------------------------------------------------------ lm-evaluation-harness
@functools.cache
def lm_eval_model_class():
    """The lm-evaluation-harness model class for a loaded ``Llama``, registered as "llama3".

    ``lm_eval.simple_evaluate(model=LM(llm), tasks=[...])``, or ``model="llama3",
    model_args="path=...,batch_size=8"`` once this has run. Needs ``pip install lm-eval``."""
    try:
        from lm_eval import utils as lm_utils
        from lm_eval.api.model import LM
        from lm_eval.api.registry import register_model
    except ImportError:
        raise ValueError("lm-evaluation-harness is not installed: pip install lm-eval") from None

    @register_model("llama3")
    class Llama3LM(LM):
        """loglikelihood, loglikelihood_rolling and generate_until over a ``Llama``."""

        def __init__(self, llm=None, path: str | None = None, batch_size: int | str = 8, max_gen_toks: int = 256,
                     **load_kwargs):
            super().__init__()
            if llm is None:
                from .loading import load

                llm = load(path, quiet=True, **load_kwargs)
            self.llm, self.batch_size, self.max_gen_toks = llm, int(batch_size), int(max_gen_toks)

        @classmethod
        def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
            args = lm_utils.simple_parse_args_string(arg_string)
            extra = {k: v for k, v in (additional_config or {}).items() if k == "batch_size" and v is not None}
            return cls(**{**args, **extra})

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            pairs = [encode_pair(self.llm, *r.args) for r in requests]
            return loglikelihood_batch(self.llm, pairs, batch_size=self.batch_size)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            """The whole text's log-likelihood, in windows of the model's context (lm-eval's rolling windows)."""
            tok, limit = self.llm.tokenizer, _max_length(self.llm)
            prefix = tok.bos_id if tok.bos_id is not None else tok.eos_id
            out = []
            for r in requests:
                ids = tok.encode(r.args[0])
                windows = [lm_utils.make_disjoint_window(w) for w in
                           lm_utils.get_rolling_token_windows(ids, prefix, limit, context_len=1)]
                out.append(sum(lp for lp, _ in loglikelihood_batch(self.llm, windows, batch_size=self.batch_size)))
            return out

        def generate_until(self, requests, disable_tqdm: bool = False):
            out = []
            for r in requests:
                context, kwargs = r.args
                kwargs = dict(kwargs or {})
                until = kwargs.pop("until", None) or []
                until = [until] if isinstance(until, str) else list(until)
                sampling = {"max_new_tokens": int(kwargs.pop("max_gen_toks", self.max_gen_toks)), "stop": until}
                if kwargs.pop("do_sample", False) and kwargs.get("temperature", 0) > 0:
                    sampling["temperature"] = float(kwargs.pop("temperature"))
                else:
                    sampling["temperature"] = 0
                out.append(self.llm.generate(context, **sampling).text)
            return out

    return Llama3LM


# ------------------------------------------------------------------------------ the command line
EPILOG_PERPLEXITY = """how it is computed (llama.cpp's llama-perplexity, so the numbers compare):
  the file's tokens are cut into chunks of --ctx tokens, each run on its own, BOS first when the
  vocabulary adds one; the second half of each chunk is scored. It prints the running PPL after
  each chunk, then the final estimate with its standard error. Lower is better; compare only runs
  with the same text, --ctx and tokenizer.

examples:
  llama3 perplexity wiki.test.raw
  llama3 perplexity --model ./Llama-3.2-1B-Q4_K_M.gguf --ctx 512 --chunks 20 wiki.test.raw
  llama3 perplexity --quantize none wiki.test.raw      # the exact float path, to compare with
"""

EPILOG_EVAL = """task files (JSON lines, one example a line, one kind per file):
  multiple choice   {"context": "Q: What is 2+2?\\nA:", "choices": ["4", "5"], "answer": 0}
                    scores " " + each choice after the context: acc (most likely choice) and
                    acc_norm (most likely per character)
  generate until    {"prompt": "Q: What is 2+2?\\nA:", "target": "4", "until": ["\\n"]}
                    greedy generation to the first "until" string: exact_match

examples:
  llama3 eval my_task.jsonl
  llama3 eval --model ./Llama-3.2-1B-Instruct --limit 100 mmlu_sample.jsonl arc_sample.jsonl
  llama3 eval --tasks hellaswag --limit 50       # lm-evaluation-harness tasks (pip install lm-eval)
  llama3 eval --tasks my_task --include-path ./my_tasks   # your own lm-eval task YAML files
"""


def add_perplexity_parser(subparsers) -> argparse.ArgumentParser:
    from .cli import _model_args

    p = subparsers.add_parser("perplexity", help="perplexity of a text file, computed as llama.cpp does",
                              description="Perplexity of the model on a text file with llama.cpp's windowing "
                                          "(the number quantizations are compared by).",
                              epilog=EPILOG_PERPLEXITY, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", metavar="FILE", help="a UTF-8 text file (e.g. wikitext-2's wiki.test.raw)")
    p.add_argument("--chunks", type=int, default=None, metavar="N", help="score only the first N chunks")
    p.add_argument("--batch-size", type=int, default=1, metavar="N", help="chunks per forward pass (default: 1)")
    _model_args(p)
    ctx = p._option_string_actions["--ctx"]  # the model flags' --ctx is the chunk size here
    ctx.default, ctx.help = 512, "tokens per chunk (default: 512, as llama-perplexity)"
    p.set_defaults(func=cmd_perplexity)
    return p


def cmd_perplexity(ns) -> int:
    from .cli import _load

    path = Path(ns.file)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8", errors="replace")
    if ns.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {ns.batch_size}")
    ctx = ns.ctx
    if ctx < 4:
        raise ValueError(f"--ctx must be at least 4, got {ctx}")
    llm = _load(ns)
    tok = llm.tokenizer
    ids = llm.encode_prompt(text) if text else []
    bos = tok.bos_id if tok.add_bos and tok.bos_id is not None else None
    print(f"{path}: {len(ids)} tokens, {len(ids) // ctx if ctx else 0} chunks of {ctx}", file=sys.stderr)

    def show(i: int, running: float) -> None:
        print(f"[{i}]{running:.4f},", end="", file=sys.stderr, flush=True)

    result = perplexity(llm, ids, ctx, bos_id=bos, n_chunks=ns.chunks, batch_size=ns.batch_size, progress=show)
    print(file=sys.stderr)
    print(f"Final estimate: PPL = {result.ppl:.4f} +/- {result.std_error:.5f}")
    return 0


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    from .cli import _model_args

    p = subparsers.add_parser("eval", help="score the model on local task files or lm-evaluation-harness tasks",
                              description="Evaluate on multiple-choice and generate-until tasks from local JSON-lines "
                                          "files, or on lm-evaluation-harness tasks with --tasks.",
                              epilog=EPILOG_EVAL, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", metavar="FILE", help="task files (.jsonl), see below")
    p.add_argument("--tasks", default=None, metavar="NAMES", help="comma-separated lm-evaluation-harness tasks")
    p.add_argument("--include-path", default=None, metavar="DIR", help="a folder of your own lm-eval task YAMLs")
    p.add_argument("--num-fewshot", type=int, default=None, metavar="K", help="lm-eval few-shot examples")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="the first N examples of each task only")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="sequences per forward pass (default: 8)")
    p.add_argument("--max-tokens", type=int, default=64, metavar="N",
                   help="most tokens generated for a generate-until example (default: 64)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    _model_args(p)
    p.set_defaults(func=cmd_eval)
    return p


def cmd_eval(ns) -> int:
    from .cli import _load

    if not ns.files and not ns.tasks:
        raise ValueError("give task files (FILE.jsonl) or --tasks NAMES; see llama3 eval --help")
    for option in ("limit", "batch_size", "max_tokens"):
        value = getattr(ns, option)
        if value is not None and value < 1:
            raise ValueError(f"--{option.replace('_', '-')} must be >= 1, got {value}")
    for f in ns.files:
        read_task(f)  # check every file before the (slow) load
    names, manager = [], None
    if ns.tasks:  # check the tasks before the load too
        lm_eval_model_class()  # says so if lm-eval is missing
        from lm_eval.tasks import TaskManager

        if ns.include_path and not Path(ns.include_path).is_dir():
            raise ValueError(f"--include-path {ns.include_path}: no such folder")
        manager = TaskManager(include_path=ns.include_path) if ns.include_path else TaskManager()
        names = [t.strip() for t in ns.tasks.split(",") if t.strip()]
        unknown = [t for t in names if t not in manager.all_tasks]
        if unknown:
            raise ValueError(f"unknown lm-eval task(s) {', '.join(unknown)} (see `lm_eval ls tasks`, or give "
                             "--include-path for your own)")
    llm = _load(ns)
    report: dict[str, dict] = {}
    for f in ns.files:
        result = evaluate_task(llm, f, limit=ns.limit, batch_size=ns.batch_size, max_new_tokens=ns.max_tokens)
        report[f] = result.metrics
        if not ns.json:
            print(result)
    if names:
        import lm_eval

        model = lm_eval_model_class()(llm, batch_size=ns.batch_size, max_gen_toks=ns.max_tokens)
        out = lm_eval.simple_evaluate(model=model, tasks=names, num_fewshot=ns.num_fewshot, limit=ns.limit,
                                      task_manager=manager)
        for task, metrics in out["results"].items():
            report[task] = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            if not ns.json:
                shown = ", ".join(f"{k} {v:.4f}" for k, v in report[task].items())
                print(f"{task}: {shown}")
    if ns.json:
        print(json.dumps(report, indent=2))
    return 0
