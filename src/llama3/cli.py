"""The ``llama3`` command: thin subcommands over the Python API.

Nothing heavy is imported at the top (torch comes with the first subcommand), so that Ctrl-C at any
moment, even while torch loads, ends the command with one line and status 130.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

# The defaults of the sampling flags, shown in --help; the values themselves come from the model.
SAMPLING_NOTE = """sampling defaults: what the model's checkpoint asks for (a Hugging Face folder's
generation_config.json, a GGUF file's general.sampling.* keys), else llama.cpp's: temperature 0.8,
top-k 40, top-p 0.95, min-p 0.05, repeat penalty 1 (off). `-v` shows which apply."""

ESCAPES_NOTE = r"""escapes: in the prompt argument, --system and --stop, backslash escapes are read as printf and
`echo -e` read them: \n newline, \t tab, \r, \\ backslash, \a \b \e \f \v,
\0NNN octal, \xHH, \uHHHH, \UHHHHHHHH; any other backslash stays as typed. --raw turns this off.
A prompt read from standard input is taken as it is."""

EPILOG_GENERATE = r"""examples:
  llama3 generate "The capital of France is"
  llama3 generate --temperature 0 --max-tokens 50 "def fibonacci(n):"
  echo "Once upon a time" | llama3 generate --seed 1
  llama3 generate --model ./Meta-Llama-3.1-8B-Instruct --stop "\n\n" "Q: Why is the sky blue?\nA:"
  llama3 generate --json-schema person.json "A person, as JSON:"
  llama3 generate --regex "[0-9]{3}-[0-9]{4}" "Call me at"

""" + ESCAPES_NOTE + "\n\n" + SAMPLING_NOTE + "\n"

SLASH_COMMANDS = (("/help", "list these commands"), ("/reset", "clear the history"),
                  ("/history", "show the conversation so far"),
                  ("/system TEXT", "set the system prompt (and clear the history); /system alone removes it"),
                  ("/exit, /quit", "leave (or Ctrl-D); Ctrl-C stops the current reply and keeps the session"))

EPILOG_CHAT = r"""examples:
  llama3 chat
  llama3 chat --system "You answer in one sentence."
  printf 'Hi!\nWhat is 2+2?\n' | llama3 chat --temperature 0
  llama3 chat --json-schema answer.json

in the session:
""" + "\n".join(f"  {c:<14}{h}" for c, h in SLASH_COMMANDS) + "\n\n" + ESCAPES_NOTE + "\n\n" + SAMPLING_NOTE + "\n"


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
    from .loading import KV_DTYPES
    from .quantize import SCHEMES

    p.add_argument("--quantize", default="auto", choices=["auto", *SCHEMES, "none"], metavar="SCHEME",
                   help="auto (default): run a GGUF's blocks and 16-bit weights as they are in the file, "
                        "with the CPU kernels; int8 (= q8_0), int4 (= q4_k, with q6_k output) or a GGUF kind "
                        f"({', '.join(s for s in SCHEMES if s not in ('int8', 'int4'))}): quantize every "
                        "matrix while loading; none: the exact float path")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="use at most N threads (default: every core; the decode step measures which count "
                        "is fastest as it runs and keeps measuring, so a busy machine does not slow it down)")
    p.add_argument("--prefill-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="dtype of prefill's matrix products for quantized/16-bit weights (default: auto = "
                        "bfloat16 on CPUs with bfloat16 hardware (AMX, AVX512_BF16), else float32)")
    p.add_argument("--kv-dtype", default="auto", choices=["auto", *KV_DTYPES],
                   help="KV cache dtype (default: auto = float16 for quantized CPU models, halving what "
                        "attention reads at long context; the model's dtype otherwise)")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the NaN/inf check of the weights at load (a vectorized pass over the file)")


def _tp_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tensor parallelism")
    g.add_argument("--tp", type=int, default=1, metavar="N",
                   help="split the model over N processes (GPUs, or CPU ranks over gloo), started here; under "
                        "torchrun (WORLD_SIZE set) the ranks are torchrun's (default: 1)")
    g.add_argument("--tp-timeout", type=float, default=300.0, metavar="S",
                   help="seconds a rank waits for the others inside the model before giving up (default: 300)")


def _sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    g = p.add_argument_group("sampling (defaults: the model's own, else llama.cpp's; see below)")
    g.add_argument("--max-tokens", "-n", type=int, default=max_tokens, metavar="N",
                   help=f"most new tokens to generate (default: {max_tokens})")
    g.add_argument("--temperature", "-t", type=float, default=None, metavar="T",
                   help="0 = greedy; higher = more random (default: the model's, else 0.8)")
    g.add_argument("--top-p", type=float, default=None, metavar="P",
                   help="nucleus sampling: keep the most likely tokens up to mass P (default: the model's, else 0.95)")
    g.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="keep the K most likely tokens, 0 = all (default: the model's, else 40)")
    g.add_argument("--min-p", type=float, default=None, metavar="P",
                   help="drop tokens below P x the top probability (default: the model's, else 0.05)")
    g.add_argument("--repeat-penalty", type=float, default=None, metavar="R",
                   help="divide the logits of tokens already seen by R (default: the model's, else 1 = off)")
    g.add_argument("--presence-penalty", type=float, default=0.0, metavar="X", help="OpenAI presence penalty")
    g.add_argument("--frequency-penalty", type=float, default=0.0, metavar="X", help="OpenAI frequency penalty")
    g.add_argument("--seed", type=int, default=None, metavar="S", help="random seed for reproducible sampling")
    g.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="stop when this text appears (repeatable; the stop text is not printed; escapes as below)")
    g.add_argument("--raw", action="store_true", help="take the prompt, --system and --stop as typed: no escapes")
    o = p.add_argument_group("output constraints (constrained decoding: the output always matches; pick one)")
    one = o.add_mutually_exclusive_group()
    one.add_argument("--json-schema", metavar="FILE", help="a JSON schema file the output must validate against")
    one.add_argument("--json-object", action="store_true", help="any JSON object")
    one.add_argument("--regex", metavar="PATTERN", help="a regular expression the whole output must match")
    one.add_argument("--grammar", metavar="FILE", help="a grammar file: llama.cpp's GBNF (root ::= ...) or Lark "
                                                       "(start: ..., as llguidance reads it)")


# printf / `echo -e` escapes: \n \t \\ \xHH \uHHHH \UHHHHHHHH \0NNN and the one-letter controls.
_ESCAPE = re.compile(r"\\(x[0-9A-Fa-f]{1,2}|u[0-9A-Fa-f]{4}|U[0-9A-Fa-f]{8}|0[0-7]{0,3}|[\\abefnrtv])")
_SIMPLE = {"\\": "\\", "a": "\a", "b": "\b", "e": "\x1b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}


def unescape(text: str) -> str:
    """``text`` with backslash escapes read as printf reads them (an unknown escape stays as typed).
    ``\\xHH`` is the character U+00HH (so "\\xe9" is "é", not a lone byte); ``\\uHHHH`` any code point."""
    def one(m: re.Match) -> str:
        e = m.group(1)
        if e[0] in "xuU":
            code = int(e[1:], 16)
            if 0xD800 <= code <= 0xDFFF or code > 0x10FFFF:
                raise ValueError(f"\\{e} is not a Unicode character")
            return chr(code)
        if e[0] == "0":
            return chr(int(e, 8))
        return _SIMPLE[e]
    return _ESCAPE.sub(one, text)


def _text(ns, value: str | None) -> str | None:
    """A prompt, system prompt or stop string as given on the command line: escapes read unless --raw."""
    return value if value is None or getattr(ns, "raw", False) else unescape(value)


def _sampling(ns) -> dict:
    """The sampling knobs the command line sets; those left out come from the model (llm.sampling_defaults)."""
    from .sampling import FALLBACK_SAMPLING, SamplingParams

    given = dict(temperature=ns.temperature, top_p=ns.top_p, top_k=ns.top_k, min_p=ns.min_p,
                 repetition_penalty=ns.repeat_penalty)
    out = {k: v for k, v in given.items() if v is not None}
    out.update(max_new_tokens=ns.max_tokens, presence_penalty=ns.presence_penalty,
               frequency_penalty=ns.frequency_penalty, seed=ns.seed, stop=[_text(ns, s) for s in ns.stop])
    SamplingParams(**{**FALLBACK_SAMPLING, **out})  # check before the (slow) load
    return out


def _read(path: str, flag: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise ValueError(f"{flag} {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{flag} {path}: cannot read it: {e}") from None


def _constraint(ns) -> dict:
    """The output constraint the flags ask for, as Llama's keyword arguments (checked when applied)."""
    import json

    if ns.json_schema:
        text = _read(ns.json_schema, "--json-schema")
        try:
            return {"json_schema": json.loads(text)}
        except ValueError as e:
            raise ValueError(f"--json-schema {ns.json_schema}: not valid JSON: {e}") from None
    if ns.grammar:
        return {"grammar": _read(ns.grammar, "--grammar")}
    if ns.regex is not None:
        return {"regex": ns.regex}
    return {"json_object": True} if ns.json_object else {}


def _load(ns):
    from .loading import load

    if ns.model is None:
        print("using the embedded default model SmolLM2-135M-Instruct (give --model PATH for another)",
              file=sys.stderr)
    session = getattr(ns, "tp_session", None)
    if session is not None:  # rank 0 of a tensor-parallel run: this rank's shard, driving every rank
        from .parallel import load as load_parallel

        llm = load_parallel(session, ns.model, dtype=ns.dtype, quantize=ns.quantize, max_context=ns.ctx, check=ns.check)
    else:
        llm = load(ns.model, device=ns.device, dtype=ns.dtype, quantize=ns.quantize, max_context=ns.ctx,
                   check=ns.check, threads=ns.threads, kv_dtype=ns.kv_dtype, prefill_dtype=ns.prefill_dtype)
    if getattr(ns, "verbose", False):
        print(f"runs as: {llm.describe()}", file=sys.stderr)
        print(f"sampling defaults: {llm.sampling_defaults} (from {llm.sampling_defaults_source})", file=sys.stderr)
    return llm


# ------------------------------------------------------------------------------ generate
def cmd_generate(ns) -> int:
    prompt = _text(ns, ns.prompt)
    if prompt is None or prompt == "-":
        if sys.stdin.isatty():
            raise ValueError("give a prompt as an argument or on standard input")
        prompt = sys.stdin.read()
    if not prompt:
        raise ValueError("the prompt is empty")
    sampling = {**_sampling(ns), **_constraint(ns)}
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
def _slash_help() -> str:
    return "\n".join(f"  {c:<14}{h}" for c, h in SLASH_COMMANDS)


def cmd_chat(ns) -> int:
    sampling = {**_sampling(ns), **_constraint(ns)}
    llm = _load(ns)
    if llm.chat_format is None:
        raise ValueError(f"{llm.path}: this model has no chat template; use `llama3 generate`")
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
        print("chatting with " + llm.path.rsplit("/", 1)[-1] + " - /help lists the commands; "
              "Ctrl-C stops a reply, Ctrl-D leaves", file=sys.stderr)
    system = _text(ns, ns.system)
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
        command, _, rest = text.partition(" ")
        if command in ("/exit", "/quit"):
            return 0
        if command in ("/help", "/?"):
            print(_slash_help(), file=sys.stderr)
            continue
        if command == "/reset":
            history = []
            print("[history cleared]", file=sys.stderr)
            continue
        if command == "/history":
            for m in ([{"role": "system", "content": system}] if system else []) + history:
                print(f"[{m['role']}] {m['content']}", file=sys.stderr)
            print(f"[{len(history)} messages]", file=sys.stderr)
            continue
        if command == "/system":
            system = rest.strip() or None
            history = []
            print(f"[system prompt {'set' if system else 'cleared'}; history cleared]", file=sys.stderr)
            continue
        if re.fullmatch(r"/[A-Za-z]+", text):  # a mistyped command, not a message for the model
            print(f"[unknown command {text}; /help lists them]", file=sys.stderr)
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
        if ns.tp > 1:
            from .parallel.explain import explain_split

            info["tensor_parallel"] = explain_split(
                args, ns.tp, batch=ns.batch or args.max_batch_size, context=ns.context, bandwidth_gbs=ns.bandwidth,
                interconnect_gbs=ns.interconnect, latency_us=ns.latency_us)
        return info, label

    if ns.compare:
        (a, la), (b, lb) = info_for(ns.compare[0]), info_for(ns.compare[1])
        print(json.dumps({la: a, lb: b}, indent=2, default=str) if ns.json else format_compare(a, b, la, lb))
        return 0
    if ns.tp < 1:
        raise ValueError(f"--tp must be >= 1, got {ns.tp}")
    info, label = info_for(ns.target)
    text = format_text(info, label)
    if "tensor_parallel" in info:
        from .parallel.explain import format_split

        text += "\n" + format_split(info["tensor_parallel"])
    print(json.dumps(info, indent=2, default=str) if ns.json else text)
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
          check=ns.check, threads=ns.threads, kv_dtype=ns.kv_dtype, prefill_dtype=ns.prefill_dtype,
          shutdown_grace=ns.shutdown_grace, load_model=(lambda: _load(ns)) if getattr(ns, "tp_session", None) else None)
    return 0


# ---------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
    _sampling_args(g, max_tokens=256)
    _tp_args(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="an interactive chat in the model's chat format",
                       description="Chat with the model. With a pipe on stdin, answers each line and exits.",
                       epilog=EPILOG_CHAT, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--system", default=None, metavar="TEXT", help="a system prompt")
    _model_args(c)
    _sampling_args(c, max_tokens=1024)
    _tp_args(c)
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
    e.add_argument("--tp", type=int, default=1, metavar="N",
                   help="show the split over N tensor-parallel ranks: what each holds, reads and sends")
    e.add_argument("--interconnect", type=float, default=50.0, metavar="GB/S",
                   help="bandwidth between ranks for --tp (default: 50; NVLink 4 ~450, PCIe 5 x16 ~64)")
    e.add_argument("--latency-us", type=float, default=10.0, metavar="US",
                   help="latency of one collective for --tp (default: 10)")
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
                               "\"content\": \"Hi\"}]}'\n\n" + SAMPLING_NOTE.replace(
                                   "sampling defaults:", "sampling defaults (for what a request leaves out):"),
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
    _tp_args(sv)
    sv.set_defaults(func=cmd_serve)

    from .evaluate import add_eval_parser, add_perplexity_parser

    add_eval_parser(sub)
    add_perplexity_parser(sub)
    return parser


def _presets():
    from .config import PRESETS

    return list(PRESETS)


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (status 2), like every other user error here."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _one_line(message: str) -> str:
    return "; ".join(line.strip() for line in str(message).splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    """The console entry point: a user error is one line on stderr and status 2, Ctrl-C (at any moment,
    the import of torch included) one line and status 130."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("\nllama3: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    from .parallel.launch import COMMANDS
    from .parallel.runtime import world_from_env

    if world_from_env()[1] > 1 or ns.command in COMMANDS and ns.tp != 1:  # tensor parallel: every rank runs this
        from .parallel.launch import main as parallel_main

        if getattr(ns, "tp", 1) < 1:
            parser.error(f"--tp must be >= 1, got {ns.tp}")
        unsupported = [flag for flag, given in (("--threads", getattr(ns, "threads", None) is not None),
                                                ("--kv-dtype", getattr(ns, "kv_dtype", "auto") != "auto"),
                                                ("--prefill-dtype", getattr(ns, "prefill_dtype", "auto") != "auto"))
                       if given]
        if unsupported:  # the ranks' engines do not take them yet: refused rather than ignored
            parser.error(f"{', '.join(unsupported)} cannot be combined with tensor parallelism yet")
        return _run(ns, lambda: parallel_main(ns, sys.argv[1:] if argv is None else list(argv), lambda: _run(ns)))
    return _run(ns)


def _run(ns, command=None) -> int:
    from .tokenizer import TokenizerError

    try:
        if command is not None:
            return command()
        return ns.func(ns)
    except (ValueError, TokenizerError, OSError) as e:
        print(f"llama3 {ns.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
