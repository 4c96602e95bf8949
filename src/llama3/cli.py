"""The ``llama3`` command: thin subcommands over the Python API."""

from __future__ import annotations

import argparse
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
    p.add_argument("--model", "-m", default=None, metavar="PATH",
                   help="a .gguf file, a Hugging Face folder or a Meta folder (default: the embedded "
                        "SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to run (default: auto = cuda if available, else cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weight dtype (default: auto = float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--ctx", type=int, default=None, metavar="N",
                   help="context length to use (default: the model's own)")


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
    from .generation import load

    if ns.model is None:
        print("using the embedded default model SmolLM2-135M-Instruct (give --model PATH for another)",
              file=sys.stderr)
    return load(ns.model, device=ns.device, dtype=ns.dtype, max_context=ns.ctx)


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
    return parser


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
