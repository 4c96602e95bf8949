"""The ``llama3`` command: thin subcommands over the Python API."""

from __future__ import annotations

import argparse
import os
import sys
import time

from .sampling import SamplingParams

_DEFAULTS = SamplingParams()

EPILOG_GENERATE = """examples:
  llama3 generate "The capital of France is"
  llama3 generate --temperature 0 --max-tokens 50 "def fibonacci(n):"
  echo "Once upon a time" | llama3 generate --seed 1
  llama3 generate --model ./Meta-Llama-3.1-8B-Instruct --stop "\\n\\n" "Q: Why is the sky blue?\\nA:"
"""
EPILOG_CHAT = """examples:
  llama3 chat
  llama3 chat --system "You answer in one sentence."
  printf 'Hi!\\nWhat is 2+2?\\n' | llama3 chat --temperature 0

in the session: /reset clears the history, /history shows it, /system TEXT sets the system prompt,
/exit or Ctrl-D leaves, Ctrl-C stops the current reply and keeps the session.
"""


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", "-v", action="store_true",
                   help="say how the model runs (weights, kernels, decoder, KV cache) before starting")
    p.add_argument("--model", "-m", default=None, metavar="PATH",
                   help="a .gguf file, a Hugging Face folder or a Meta folder (default: the embedded "
                        "SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to run (default: auto = cuda if available, else cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weight dtype (default: auto = float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--ctx", type=int, default=None, metavar="N",
                   help="context length to use (default: the model's own)")
    p.add_argument("--quantize", default="auto", choices=["auto", "int8", "int4", "none"],
                   help="auto (default): keep a GGUF's quantized blocks and run them with the quantized CPU "
                        "kernels; int8/int4: quantize float weights on load; none: the exact float path")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the NaN/inf check of the weights at load (a vectorized pass over the file)")


def _sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", "-n", type=int, default=max_tokens, metavar="N",
                   help=f"most new tokens to generate (default: {max_tokens})")
    g.add_argument("--temperature", "-t", type=float, default=_DEFAULTS.temperature, metavar="T",
                   help=f"0 = greedy; higher = more random (default: {_DEFAULTS.temperature})")
    g.add_argument("--top-p", type=float, default=_DEFAULTS.top_p, metavar="P",
                   help=f"nucleus sampling: keep the most likely tokens up to mass P (default: {_DEFAULTS.top_p})")
    g.add_argument("--top-k", type=int, default=_DEFAULTS.top_k, metavar="K",
                   help=f"keep the K most likely tokens, 0 = all (default: {_DEFAULTS.top_k})")
    g.add_argument("--min-p", type=float, default=_DEFAULTS.min_p, metavar="P",
                   help=f"drop tokens below P x the top probability (default: {_DEFAULTS.min_p})")
    g.add_argument("--repeat-penalty", type=float, default=_DEFAULTS.repetition_penalty, metavar="R",
                   help="divide the logits of tokens already seen by R (default: 1 = off)")
    g.add_argument("--presence-penalty", type=float, default=0.0, metavar="X", help="OpenAI presence penalty")
    g.add_argument("--frequency-penalty", type=float, default=0.0, metavar="X", help="OpenAI frequency penalty")
    g.add_argument("--seed", type=int, default=None, metavar="S", help="random seed for reproducible sampling")
    g.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="stop when this text appears (repeatable; the stop text is not printed)")


def _sampling(ns) -> dict:
    return dict(max_new_tokens=ns.max_tokens, temperature=ns.temperature, top_p=ns.top_p, top_k=ns.top_k,
                min_p=ns.min_p, repetition_penalty=ns.repeat_penalty, presence_penalty=ns.presence_penalty,
                frequency_penalty=ns.frequency_penalty, seed=ns.seed,
                stop=[s.encode().decode("unicode_escape") for s in ns.stop])


def _load(ns):
    from .loading import load

    if ns.model is None:
        print("using the embedded default model SmolLM2-135M-Instruct (give --model PATH for another)",
              file=sys.stderr)
    llm = load(ns.model, device=ns.device, dtype=ns.dtype, quantize=ns.quantize, max_context=ns.ctx, check=ns.check)
    if getattr(ns, "verbose", False):
        print(f"runs as: {llm.describe()}", file=sys.stderr)
    return llm


# ------------------------------------------------------------------------------ generate
def cmd_generate(ns) -> int:
    prompt = ns.prompt
    if prompt is None or prompt == "-":
        if sys.stdin.isatty():
            raise ValueError("give a prompt as an argument or on standard input")
        prompt = sys.stdin.read()
    if not prompt:
        raise ValueError("the prompt is empty")
    sampling = _sampling(ns)
    SamplingParams(**sampling)  # validate before the (slow) load
    llm = _load(ns)
    t0 = time.perf_counter()
    first = None
    n = 0
    reason = None
    for step in llm.stream(prompt, **sampling):
        if first is None:
            first = time.perf_counter()
        n += 1
        sys.stdout.write(step.text)
        sys.stdout.flush()
        reason = step.finish_reason
    end = time.perf_counter()
    sys.stdout.write("\n")
    prompt_tokens = len(llm.encode_prompt(prompt))
    decode = (n - 1) / (end - first) if first and n > 1 and end > first else float("nan")
    print(f"[{prompt_tokens} prompt tokens, {n} generated, finish: {reason}; "
          f"prefill {prompt_tokens / (first - t0):.1f} tok/s, decode {decode:.1f} tok/s]", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------- chat
def cmd_chat(ns) -> int:
    sampling = _sampling(ns)
    SamplingParams(**sampling)
    llm = _load(ns)
    if llm.chat_format is None:
        raise ValueError(f"{llm.path}: this model has no chat template; use `llama3 generate`")
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
        print("chatting with " + llm.path.rsplit("/", 1)[-1] + " - /reset, /system TEXT, /exit; "
              "Ctrl-C stops a reply, Ctrl-D leaves", file=sys.stderr)
    system = ns.system
    history: list[dict] = []
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            if interactive:
                print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print("^C (Ctrl-D or /exit to leave)", file=sys.stderr)
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = []
            print("[history cleared]", file=sys.stderr)
            continue
        if text == "/history":
            for m in ([{"role": "system", "content": system}] if system else []) + history:
                print(f"[{m['role']}] {m['content']}", file=sys.stderr)
            print(f"[{len(history)} messages]", file=sys.stderr)
            continue
        if text.startswith("/system"):
            system = text[len("/system"):].strip() or None
            history = []
            print(f"[system prompt {'set' if system else 'cleared'}; history cleared]", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        reply = []
        try:
            for step in llm.stream_chat(messages, **sampling):
                reply.append(step.text)
                sys.stdout.write(step.text)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        except ValueError as e:  # e.g. the conversation outgrew the context
            history.pop()
            print(f"\nerror: {e} (/reset to start over)", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": "".join(reply)})


# ------------------------------------------------------------------------- look inside
def cmd_explain(ns) -> int:
    import json

    from .explain.glossary import checkpoint_param_counts, explain, format_compare, format_text, resolve

    def info_for(target):
        from .explain.glossary import execution_path

        args, shapes, label = resolve(target)
        counts = checkpoint_param_counts(shapes) if shapes is not None else None
        info = explain(args, tensor_counts=counts, batch=ns.batch, context=ns.context, bandwidth_gbs=ns.bandwidth)
        if shapes is not None:
            info["execution"] = execution_path(target)
        return info, label

    if ns.compare:
        (a, la), (b, lb) = info_for(ns.compare[0]), info_for(ns.compare[1])
        print(json.dumps({la: a, lb: b}, indent=2, default=str) if ns.json else format_compare(a, b, la, lb))
        return 0
    info, label = info_for(ns.target)
    print(json.dumps(info, indent=2, default=str) if ns.json else format_text(info, label))
    return 0


def _prompt_tokens(llm, prompt):
    import torch

    if prompt is None or prompt == "-":
        prompt = sys.stdin.read()
    ids = llm.encode_prompt(prompt)
    if len(ids) > llm.generator.context:
        raise ValueError(f"the prompt has {len(ids)} tokens, but the context holds {llm.generator.context}")
    return torch.tensor([ids], device=llm.device), [llm.tokenizer.decode([i]) for i in ids]


def _layers(text, n):
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--layers must be comma-separated integers like 0,1,-1, got {text!r}") from None


def cmd_trace(ns) -> int:
    import torch

    from .explain.trace import Trace, trace_text

    llm = _load(ns)
    tokens, texts = _prompt_tokens(llm, ns.prompt)
    layers = _layers(ns.layers, llm.args.n_layers) or [0, -1]
    seq = tokens.shape[1]
    if not -seq <= ns.position < seq:
        raise ValueError(f"--position {ns.position} is outside the prompt's {seq} tokens")
    a = llm.args
    print(f"prompt: {seq} tokens {texts}")
    print(f"model: dim {a.dim}, {a.n_layers} layers, {a.n_heads} query heads sharing {a.kv_heads} KV heads "
          f"({a.n_rep} per group), head_dim {a.head_dim}, FFN {a.hidden_dim}")
    print(f"statistics at position {ns.position} ({texts[ns.position]!r}); attention rows are that query's\n")
    with torch.inference_mode(), Trace(llm.model, layers=layers) as t:
        logits = llm.model(tokens)
    print(trace_text(t.records, position=ns.position))
    probs = torch.softmax(logits[0, ns.position], dim=-1)
    top = torch.topk(probs, ns.top_k)
    print("\nnext token after position", ns.position, ":",
          ", ".join(f"{llm.tokenizer.decode([int(i)])!r} {float(p):.3f}" for p, i in zip(top.values, top.indices)))
    return 0


def cmd_lens(ns) -> int:
    from .explain.lens import lens_heatmap, lens_table, logit_lens

    llm = _load(ns)
    tokens, texts = _prompt_tokens(llm, ns.prompt)
    positions = None if not ns.all_positions else list(range(tokens.shape[1]))
    rows = logit_lens(llm.model, tokens, top_k=ns.top_k, positions=positions)
    print(lens_table(rows, llm.tokenizer.decode))
    if ns.all_positions:
        os.makedirs(ns.out, exist_ok=True)
        path = os.path.join(ns.out, "lens.png")
        lens_heatmap(rows, texts, llm.tokenizer.decode, path)
        print(f"\nheatmap: {path}", file=sys.stderr)
    return 0


def cmd_attention(ns) -> int:
    from .explain.attention import attention_maps, save_attention_pngs

    llm = _load(ns)
    tokens, texts = _prompt_tokens(llm, ns.prompt)
    n = llm.args.n_layers
    if not -n <= ns.layer < n:
        raise ValueError(f"--layer {ns.layer} does not exist: the model has layers 0..{n - 1}")
    layer = ns.layer % n
    probs = attention_maps(llm.model, tokens, layer)
    for path in save_attention_pngs(probs, texts, ns.out, layer, ns.head):
        print(path)
    return 0


def cmd_bench(ns) -> int:
    import json

    from .bench import format_table, run_bench

    compare = [c.strip() for c in ns.compare.split(",") if c.strip()] if ns.compare else []
    unknown = set(compare) - {"llama.cpp", "transformers"}
    if unknown:
        raise ValueError(f"--compare takes llama.cpp and/or transformers, got {sorted(unknown)}")
    for name, value in (("--prompt-tokens", ns.prompt_tokens), ("--new-tokens", ns.new_tokens),
                        ("--repeats", ns.repeats)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    total = ns.repeats * (1 + len(compare))
    done = [0]

    def progress(name, r):
        done[0] += 1
        if sys.stderr.isatty():
            print(f"\r[{done[0]}/{total}] {name} repeat {r + 1}", end="", file=sys.stderr, flush=True)

    report = run_bench(ns.model, ns.prompt_tokens, ns.new_tokens, ns.repeats, ns.threads, compare,
                       ns.dtype, ns.quantize, progress)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    print(json.dumps(report, indent=2) if ns.json else format_table(report))
    return 0


def cmd_serve(ns) -> int:
    from .server import serve

    for name, value in (("--max-batch", ns.max_batch), ("--max-queue", ns.max_queue), ("--port", ns.port)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not 0 <= ns.shutdown_grace <= 3600:
        raise ValueError(f"--shutdown-grace must be in [0, 3600] seconds, got {ns.shutdown_grace}")
    if ns.model is None:
        print("serving the embedded default model SmolLM2-135M-Instruct (give --model PATH for another)",
              file=sys.stderr)
    serve(ns.model, host=ns.host, port=ns.port, api_key=ns.api_key, max_batch=ns.max_batch, max_queue=ns.max_queue,
          ctx=ns.ctx, cors_origins=ns.cors_origin or None, device=ns.device, dtype=ns.dtype, quantize=ns.quantize,
          check=ns.check, shutdown_grace=ns.shutdown_grace)
    return 0


# ---------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama3", description="Run and look inside Llama 3 models (Meta, Hugging Face and GGUF checkpoints).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="run `llama3 COMMAND --help` for each command's options and examples")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    g = sub.add_parser("generate", help="continue a prompt, streaming to stdout",
                       description="Continue a prompt. The text streams to stdout; counts and speed go to stderr.",
                       epilog=EPILOG_GENERATE, formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("prompt", nargs="?", default=None, help="the prompt (or '-' / omit to read standard input)")
    _model_args(g)
    _sampling_args(g, max_tokens=_DEFAULTS.max_new_tokens)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="an interactive chat in the model's chat format",
                       description="Chat with the model. With a pipe on stdin, answers each line and exits.",
                       epilog=EPILOG_CHAT, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--system", default=None, metavar="TEXT", help="a system prompt")
    _model_args(c)
    _sampling_args(c, max_tokens=1024)
    c.set_defaults(func=cmd_chat)

    e = sub.add_parser("explain", help="a model's config, explained: derived sizes, parameters, memory, speed",
                       description="Every config field with its meaning, the numbers derived from them with the "
                                   "arithmetic shown, parameters per component, memory and the decode speed limit.",
                       epilog="examples:\n  llama3 explain\n  llama3 explain llama-3.1-8b --context 8192 --batch 1\n"
                              "  llama3 explain --compare llama-3.2-1b llama-3.2-3b\n"
                              "  llama3 explain ./model.gguf --json\n\npresets: " + ", ".join(_presets()),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("target", nargs="?", default=None, metavar="MODEL|PRESET",
                   help="a checkpoint path or a preset name (default: the embedded model)")
    e.add_argument("--compare", nargs=2, metavar=("A", "B"), help="two models or presets side by side")
    e.add_argument("--json", action="store_true", help="machine-readable output")
    e.add_argument("--batch", type=int, default=None, help="KV cache batch (default: max_batch_size)")
    e.add_argument("--context", type=int, default=None, help="KV cache context (default: max_seq_len)")
    e.add_argument("--bandwidth", type=float, default=20.0, metavar="GB/S",
                   help="memory bandwidth for the decode speed limit (default: 20, this machine's)")
    e.set_defaults(func=cmd_explain)

    t = sub.add_parser("trace", help="one forward pass, stage by stage, with shapes and statistics",
                       description="Run the prompt once and show every stage of the chosen blocks: shapes, dtype, "
                                   "mean, std, min, max and RMS at one position.",
                       epilog="examples:\n  llama3 trace \"The capital of France is\"\n"
                              "  llama3 trace --layers 0,5,-1 --position 2 \"Hello world\"",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("prompt", nargs="?", default=None)
    t.add_argument("--layers", default=None, help="comma-separated blocks to show, negatives from the end "
                                                  "(default: 0,-1)")
    t.add_argument("--position", type=int, default=-1, help="which token's statistics (default: -1, the last)")
    t.add_argument("--top-k", type=int, default=5, help="next tokens to list (default: 5)")
    _model_args(t)
    t.set_defaults(func=cmd_trace)

    lens = sub.add_parser("lens", help="the logit lens: what each layer would predict",
                          description="Apply the final norm and the output projection to every layer's residual "
                                      "stream and list the top next tokens.",
                          epilog="examples:\n  llama3 lens \"The capital of France is\"\n"
                                 "  llama3 lens --all-positions --out lens_out \"The Eiffel Tower is in\"",
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    lens.add_argument("prompt", nargs="?", default=None)
    lens.add_argument("--top-k", type=int, default=5, help="tokens per layer (default: 5)")
    lens.add_argument("--all-positions", action="store_true", help="every position, plus a heatmap PNG")
    lens.add_argument("--out", default=".", metavar="DIR", help="where the heatmap goes (default: .)")
    _model_args(lens)
    lens.set_defaults(func=cmd_lens)

    at = sub.add_parser("attention", help="attention maps as PNG heatmaps (and .npy)",
                        description="Draw one layer's attention probabilities, tokens on both axes: one PNG per "
                                    "head and a grid of all heads, with the numbers as .npy.",
                        epilog="examples:\n  llama3 attention \"The cat sat on the mat\" --layer 3 --out maps\n"
                               "  llama3 attention --layer -1 --head 0 --out maps \"Hello world\"",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    at.add_argument("prompt", nargs="?", default=None)
    at.add_argument("--layer", type=int, required=True, help="which block (negatives count from the end)")
    at.add_argument("--head", type=int, default=None, help="one head only (default: every head and a grid)")
    at.add_argument("--out", required=True, metavar="DIR", help="folder for the PNG and .npy files")
    _model_args(at)
    at.set_defaults(func=cmd_attention)

    b = sub.add_parser("bench", help="prefill and decode speed, side by side with llama.cpp and transformers",
                       description="Measure prefill tokens/s, decode tokens/s, time to first token and peak RSS "
                                   "over repeats (greedy, no stop token). Peers (llama-cpp-python, transformers) "
                                   "run on the same file, prompt and threads, in their own processes, alternating.",
                       epilog="examples:\n  llama3 bench\n  llama3 bench --compare llama.cpp,transformers\n"
                              "  llama3 bench --threads 1 --new-tokens 64 --json\n"
                              "  llama3 bench --quantize none   # the exact float path",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--model", "-m", default=None, metavar="PATH", help="default: the embedded model")
    b.add_argument("--prompt-tokens", type=int, default=256, help="prompt length (default: 256)")
    b.add_argument("--new-tokens", type=int, default=128, help="tokens to generate (default: 128)")
    b.add_argument("--repeats", type=int, default=5, help="measurements per engine (default: 5)")
    b.add_argument("--threads", type=int, default=None, help="threads for every engine (default: all cores)")
    b.add_argument("--compare", default="", metavar="PEERS", help="comma-separated: llama.cpp,transformers")
    b.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    b.add_argument("--quantize", default="auto", choices=["auto", "int8", "int4", "none"],
                   help="our weights: auto = keep GGUF blocks quantized; none = the exact float path")
    b.add_argument("--json", action="store_true", help="machine-readable output")
    b.set_defaults(func=cmd_bench)

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching",
                        description="Serve the model over OpenAI's API: /v1/chat/completions, /v1/completions "
                                    "(streaming or not), /v1/models, /health, /metrics, /tokenize, /detokenize. "
                                    "A chat request without max_tokens generates at most 4096 tokens (or what "
                                    "the context has left); a completion, 16 (as OpenAI's).",
                        epilog="examples:\n  llama3 serve\n  llama3 serve --port 8080 --api-key secret\n"
                               "  llama3 serve --model ./Llama-3.2-1B-Instruct --max-batch 4 --ctx 4096\n\n"
                               "then:\n  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: "
                               "application/json' \\\n    -d '{\"messages\": [{\"role\": \"user\", "
                               "\"content\": \"Hi\"}]}'",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_args(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    sv.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    sv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (/health stays open)")
    sv.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (default: 8)")
    sv.add_argument("--max-queue", type=int, default=64, help="requests waiting before 429 (default: 64)")
    sv.add_argument("--shutdown-grace", type=float, default=30.0, metavar="SECONDS",
                    help="on SIGTERM, let requests in flight finish for this long, then end them with a final "
                         "event (default: 30; SIGINT: at most 1)")
    sv.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                    help="allow browser requests from this origin (repeatable; default: no CORS)")
    sv.set_defaults(func=cmd_serve)
    return parser


def _presets():
    from .config import PRESETS

    return list(PRESETS)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    from .tokenizer import TokenizerError

    try:
        return ns.func(ns)
    except (ValueError, TokenizerError, OSError) as e:
        print(f"llama3 {ns.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
