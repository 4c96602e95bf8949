"""Chat formats: Llama 3's header format in code, and jinja2 chat templates in a sandbox.

Both return the prompt as text and as token ids. Message contents are always encoded as
plain text (a user who types ``<|eot_id|>`` cannot end a turn); only the format's own
markup becomes special tokens. There is one BOS, never two.

A chat template comes from the model file, so it is untrusted code. It runs in jinja2's
immutable sandbox (no attribute escapes, no mutation of its arguments) with a budget per render:

- time: ``RENDER_SECONDS`` of the rendering thread's CPU time, checked at every loop iteration,
  call, attribute or item access, operator and output;
- size: no string or list it builds, and not all it writes together, may exceed
  ``RENDER_CHARS`` plus 4x the characters of the messages; operations that would (``"x" * n``,
  ``width``/``indent`` arguments, printf widths, ``replace``, ``join``) are refused before they
  allocate, and integers stay below ``MAX_INT_BITS`` bits;
- depth: calls (macros, ``loop()`` recursion) nest at most ``MAX_CALL_DEPTH`` deep.

Any failure, a Python error from the template included, is a ``ChatTemplateError``.
"""

from __future__ import annotations

import datetime
import json
import re
import reprlib
import string
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import wraps

from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .tokenizer import Tokenizer

Message = Mapping[str, str]
ROLES = ("system", "user", "assistant", "tool", "ipython")

RENDER_SECONDS = 2.0  # CPU seconds for one render
RENDER_CHARS = 1_000_000  # characters a render may build and write, beyond 4x its messages
MAX_INT_BITS = 4096  # integers a template computes with * and **
MAX_CALL_DEPTH = 64  # nested calls: macros calling macros, recursive loops
MAX_TEMPLATE_CHARS = 256 * 1024  # the largest published chat templates are ~20 KB
MAX_JSON_INDENT = 16


class ChatTemplateError(ValueError):
    """A chat template that cannot be rendered, or one that tried to leave its sandbox."""


def _check_messages(messages: Sequence[Message]) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content'")
        if not isinstance(m["role"], str):
            raise ValueError(f"messages[{i}]['role'] must be a string")
        if not isinstance(m["content"], str):
            raise ValueError(f"messages[{i}]['content'] must be a string")


class Llama3ChatFormat:
    """Meta's ChatFormat (llama/tokenizer.py):

    <|begin_of_text|> then, per message,
    <|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>
    and finally an open <|start_header_id|>assistant<|end_header_id|>\\n\\n for the reply.
    """

    name = "llama3"

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        st = tokenizer.special_tokens
        missing = [t for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>") if t not in st]
        if missing:
            raise ValueError(f"{tokenizer.path}: the vocabulary lacks {missing}: not a Llama 3 chat vocabulary")
        self.start_header, self.end_header, self.eot = \
            st["<|start_header_id|>"], st["<|end_header_id|>"], st["<|eot_id|>"]

    def encode_header(self, role: str) -> list[int]:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
        return [self.start_header] + self.tokenizer.encode(role) + [self.end_header] + self.tokenizer.encode("\n\n")

    def encode_message(self, message: Message) -> list[int]:
        return self.encode_header(message["role"]) + self.tokenizer.encode(message["content"].strip()) + [self.eot]

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> tuple[str, list[int]]:
        _check_messages(messages)
        bos = self.tokenizer.bos_id
        ids = [bos] if bos is not None else []  # a vocabulary with the header tokens but no BOS: none
        for m in messages:
            ids += self.encode_message(m)
        if add_generation_prompt:
            ids += self.encode_header("assistant")
        return self.tokenizer.decode(ids), ids


class JinjaChatFormat:
    """A Hugging Face / GGUF chat template rendered in jinja2's immutable sandbox, within a budget.

    Message contents are swapped for unique markers while rendering, so the template's own
    text (its special tokens) and the users' text are encoded separately: the first with
    special tokens allowed, the second as plain text.
    """

    name = "jinja"

    def __init__(self, template: str, tokenizer: Tokenizer, source: str = "chat template", *,
                 render_seconds: float = RENDER_SECONDS, render_chars: int = RENDER_CHARS,
                 max_call_depth: int = MAX_CALL_DEPTH):
        self.tokenizer, self.source, self.template_text = tokenizer, source, template
        self.render_seconds, self.render_chars = render_seconds, render_chars
        if not isinstance(template, str):
            raise ChatTemplateError(f"{source}: the chat template is not text ({type(template).__name__})")
        if len(template) > MAX_TEMPLATE_CHARS:
            raise ChatTemplateError(f"{source}: the chat template has {len(template)} characters, more than "
                                    f"{MAX_TEMPLATE_CHARS}")
        self._env = _BudgetedEnvironment(max_call_depth)
        try:
            self.template = self._env.from_string(template)
        except Exception as e:  # noqa: BLE001 - syntax errors, and RecursionError/MemoryError from odd nesting
            raise ChatTemplateError(f"{source}: the chat template does not compile: {type(e).__name__}: {e}") from None

        def name_of(token_id):
            return tokenizer.decode([token_id]) if token_id is not None else ""

        self.bos_token, self.eos_token = name_of(tokenizer.bos_id), name_of(tokenizer.eos_id)

    def render_text(self, messages: Sequence[Message], add_generation_prompt: bool = True, **extra) -> str:
        """The template's text for ``messages`` (budgeted; ``ChatTemplateError`` on any failure)."""
        size = sum(len(m["content"]) for m in messages if isinstance(m, Mapping) and isinstance(m.get("content"), str))
        parts: list[str] = []
        try:
            with self._env.budget(self.render_seconds, self.render_chars + 4 * size) as budget:
                for chunk in self.template.generate(messages=[dict(m) for m in messages],
                                                    add_generation_prompt=add_generation_prompt,
                                                    bos_token=self.bos_token, eos_token=self.eos_token, **extra):
                    budget.tick()
                    parts.append(chunk)
        except ChatTemplateError as e:
            raise ChatTemplateError(f"{self.source}: {e}") from None
        except Exception as e:  # noqa: BLE001 - a template can raise anything Python can
            from jinja2.exceptions import SecurityError

            if isinstance(e, SecurityError):
                raise ChatTemplateError(f"{self.source}: the chat template tried to leave its sandbox: {e}") from None
            raise ChatTemplateError(f"{self.source}: the chat template failed: {type(e).__name__}: "
                                    f"{str(e)[:500]}") from None
        return "".join(parts)

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> tuple[str, list[int]]:
        _check_messages(messages)
        text = self.render_text(messages, add_generation_prompt)
        markers = [f"\x00{uuid.uuid4().hex}\x00" for _ in messages]
        masked = [dict(m, content=k) for m, k in zip(messages, markers)]
        skeleton = self.render_text(masked, add_generation_prompt)
        spans = _content_spans(skeleton, markers, messages, text)
        if spans is None:  # the template transformed the contents; refuse injected markup instead
            for m in messages:
                hits = [name for name in self.tokenizer.special_tokens if name in m["content"]]
                if hits:
                    raise ChatTemplateError(f"{self.source}: message content contains special-token text "
                                            f"{hits[0]!r}, which this chat template cannot keep apart from its "
                                            "own markup")
            spans = []
        ids = self._encode_outside(text, spans)
        bos = self.tokenizer.bos_id
        if self.tokenizer.add_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids  # the tokenizer adds BOS and the template did not
        return text, ids

    def _encode_outside(self, text: str, spans: list[tuple[int, int]]) -> list[int]:
        """Encode ``text`` as the tokenizer would with special tokens allowed, except that special-token
        names inside the message contents (``spans``) stay plain text. Splitting only at the format's
        own special tokens keeps the tokens identical to encoding the whole string."""
        special = self.tokenizer.special_tokens
        ids: list[int] = []
        start = 0
        for m in self.tokenizer.special_pattern.finditer(text):
            if any(a < m.end() and m.start() < b for a, b in spans):
                continue
            ids += self.tokenizer.encode(text[start:m.start()]) + [special[m.group()]]
            start = m.end()
        return ids + self.tokenizer.encode(text[start:])


def _content_spans(skeleton: str, markers: list[str], messages, text: str) -> list[tuple[int, int]] | None:
    """Where each message's content sits in the rendered text, or None if the template did not
    place every content exactly once and unchanged."""
    spans, out, rest = [], [], skeleton
    for marker, m in zip(markers, messages):
        if rest.count(marker) != 1:
            return None
        before, rest = rest.split(marker)
        out.append(before)
        start = sum(map(len, out))
        out.append(m["content"])
        spans.append((start, start + len(m["content"])))
    out.append(rest)
    return spans if "".join(out) == text else None


def chat_format_for(tokenizer: Tokenizer, template: str | None, source: str = "chat template"):
    """The model's chat format: its own template, else Llama 3's format if its vocabulary has the
    header tokens, else None (the model has no chat format)."""
    if template:
        return JinjaChatFormat(template, tokenizer, source)
    if all(t in tokenizer.special_tokens for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")):
        return Llama3ChatFormat(tokenizer)
    return None


# ----------------------------------------------------------------------------- the render budget
class _Budget:
    """What one render may still spend. ``tick`` is called at every step the template takes."""

    def __init__(self, seconds: float, chars: int, max_depth: int):
        self.seconds, self.chars, self.max_depth = seconds, chars, max_depth
        self.deadline = time.thread_time() + seconds
        self.steps = self.written = self.depth = 0

    def tick(self) -> None:
        self.steps += 1
        if self.steps % 256 == 0 and time.thread_time() > self.deadline:  # reading the clock costs ~1 us
            raise ChatTemplateError(f"the chat template ran past its time budget of {self.seconds} s")

    def output(self, value):
        """Count what the template writes, to its output or to a buffer (a macro, a set block), before
        it becomes text."""
        self.tick()
        self.written += self.weight(value, "a value")
        if self.written > self.chars:
            raise ChatTemplateError(f"the chat template wrote more than its budget of {self.chars} characters")
        return value

    def weight(self, value, what: str) -> int:
        """About how long ``str(value)`` is, found without building it -- a list of 1000 references to a
        1 MB string is small, its text is not -- and refused past the budget."""
        from jinja2.utils import Namespace

        total, stack = 0, [value]
        while stack:
            v = stack.pop()
            if isinstance(v, str):
                total += len(v)
            elif isinstance(v, (list, tuple, set, frozenset, dict, Namespace)):
                items = v._Namespace__attrs if isinstance(v, Namespace) else v  # what its repr shows
                total += 2 + 4 * len(items)
                stack.extend(items.items() if isinstance(items, dict) else items)
                if len(stack) % 1024 == 0:
                    self.tick()
            else:
                total += 24  # a number (integers are kept below MAX_INT_BITS), None, an undefined
            if total > self.chars:
                raise ChatTemplateError(f"the chat template would write {what} of more than its budget of "
                                        f"{self.chars} characters")
        return total

    def size(self, n: int, what: str) -> None:
        if n > self.chars:
            raise ChatTemplateError(f"the chat template would build {what} of length {n}, beyond its budget of "
                                    f"{self.chars}")

    def value(self, v):
        """A value the template computed: strings and lists within the size budget, integers within bits."""
        if isinstance(v, (str, list, tuple, dict)):
            self.size(len(v), type(v).__name__)
        elif isinstance(v, int) and v.bit_length() > MAX_INT_BITS:
            raise ChatTemplateError(f"the chat template computed an integer of {v.bit_length()} bits "
                                    f"(at most {MAX_INT_BITS})")
        return v

    def arguments(self, args, kwargs) -> None:
        """Integer arguments (widths, counts, lengths) stay within the size budget."""
        for a in (*args, *kwargs.values()):
            if isinstance(a, int) and not isinstance(a, bool) and abs(a) > self.chars:
                raise ChatTemplateError(f"the chat template passed the number {a}, beyond its budget of {self.chars}")

    def binop(self, op: str, a, b) -> None:
        """Refuse what would grow too large before Python allocates it."""
        seq = (str, list, tuple)
        if op == "*" and (isinstance(a, int) and isinstance(b, seq) or isinstance(a, seq) and isinstance(b, int)):
            seq_len, n = (len(b), a) if isinstance(b, seq) else (len(a), b)
            self.size(seq_len * max(n, 0), "a repeated sequence")
        elif op == "*" and isinstance(a, int) and isinstance(b, int):
            self.value(1 << min(a.bit_length() + b.bit_length(), MAX_INT_BITS + 1))
        elif op == "**" and isinstance(a, int) and isinstance(b, int) and b > 0 and abs(a) > 1:
            self.value(1 << min(a.bit_length() * b, MAX_INT_BITS + 1))
        elif op == "+" and isinstance(a, seq) and isinstance(b, seq):
            self.size(len(a) + len(b), "a concatenation")
        elif op == "%" and isinstance(a, str):
            self.printf(a, b if isinstance(b, tuple) else (b,))

    def printf(self, fmt: str, args) -> None:
        """A printf-style format's widths and precisions (``%10000000s``, ``%*d``) and arguments within
        the budget."""
        stars = [a for a in args if isinstance(a, int)]
        width = len(fmt) + self.weight(list(args), "a formatted string")
        for m in _PRINTF_SPEC.finditer(fmt):
            for number in m.groups():
                width += max(stars, default=0) if number == "*" else int(number or 0)
        self.size(width, "a formatted string")

    def str_format(self, fmt: str, args, kwargs) -> None:
        """The same for ``str.format`` specs (``{:>10000000}``); nested fields take the largest int given."""
        largest = max((a for a in (*args, *kwargs.values()) if isinstance(a, int)), default=0)
        width = len(fmt) + self.weight([*args, *kwargs.values()], "a formatted string")
        for _, _, spec, _ in string.Formatter().parse(fmt):
            if spec:
                width += sum(int(n) for n in re.findall(r"\d+", spec)) + spec.count("{") * largest
        self.size(width, "a formatted string")

    def filter(self, name: str, value, args, kwargs) -> None:
        """Size checks for the filters whose result can outgrow their inputs (``value|name(*args)``)."""
        self.arguments(args, kwargs)
        if name in _STRINGIFYING_FILTERS:
            self.weight(value, f"the text of |{name}'s input")
        first = kwargs.get("width", args[0] if args else 4) if name == "indent" else args[0] if args else None
        if name == "indent" and isinstance(value, str):
            step = len(first) if isinstance(first, str) else first if isinstance(first, int) else 0
            self.size(len(value) + (value.count("\n") + 1) * step, "an indented string")
        elif name == "replace" and isinstance(value, str):
            self.replace(value, args)
        elif name == "join" and isinstance(value, (list, tuple)):
            separator = kwargs.get("d", first if first is not None else "")
            self.size(self.weight(value, "a joined string") + len(value) * self.weight(separator, "a separator"),
                      "a joined string")
        elif name == "format" and isinstance(value, str):
            self.printf(value, args)
        elif name == "sum" and not isinstance(kwargs.get("start", args[1] if len(args) > 1 else 0), (int, float)):
            raise ChatTemplateError("the chat template summed non-numbers (quadratic time: refused)")

    def method(self, name: str, obj: str, args, kwargs) -> None:
        """Size checks for the str methods whose result can outgrow their inputs (``obj.name(*args)``)."""
        self.arguments(args, kwargs)
        first = args[0] if args else None
        if name == "expandtabs":
            self.size(len(obj) + obj.count("\t") * (first if isinstance(first, int) else 8), "an expanded string")
        elif name == "replace":
            self.replace(obj, args)
        elif name == "join" and isinstance(first, (list, tuple)):
            self.size(self.weight(first, "a joined string") + len(first) * len(obj), "a joined string")
        elif name in ("format", "format_map"):
            self.str_format(obj, args, kwargs)

    def listed(self, value):
        """A generator as the list it yields (at most the budget's length of items); anything else as is."""
        if isinstance(value, (str, bytes, list, tuple, dict, set, frozenset)) or not hasattr(value, "__next__"):
            return value
        items = []
        for item in value:
            items.append(item)
            self.tick()
            self.size(len(items), "a list")
        return items

    def replace(self, text: str, args) -> None:
        if len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
            old, new = args[0], args[1]
            count = len(text) + 1 if not old else text.count(old)
            self.size(len(text) + count * max(len(new) - len(old), 0), "a replaced string")


# jinja2's filters that turn their value into text (str() of a list shows every element).
_STRINGIFYING_FILTERS = frozenset({"string", "tojson", "pprint", "format", "join", "urlencode", "xmlattr", "e",
                                   "escape", "forceescape", "safe", "striptags", "title", "upper", "lower",
                                   "capitalize", "trim", "wordcount", "truncate", "wordwrap", "center", "indent",
                                   "replace", "urlize"})

# %[(name)][flags][width][.precision]type: the width and precision groups
_PRINTF_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?")


class _BudgetedCodeGenerator(CodeGenerator):
    """jinja2's code generator, with three more hooks into the environment: every ``for`` loop
    iterates through ``budget_iter``, every ``~`` joins through ``budget_concat``, and every piece
    of output (constant text included) goes through ``budget_output`` before it becomes text."""

    def visit_For(self, node: nodes.For, frame) -> None:
        guarded = nodes.Call(nodes.EnvironmentAttribute("budget_iter"), [node.iter], [], None, None,
                             lineno=node.lineno)
        node = nodes.For(node.target, guarded, node.body, node.else_, node.test, node.recursive,
                         lineno=node.lineno)
        super().visit_For(node, frame)

    def visit_Concat(self, node: nodes.Concat, frame) -> None:
        self.write("environment.budget_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")

    def _output_const_repr(self, group) -> str:
        return f"environment.budget_output({super()._output_const_repr(group)})"

    def _output_child_pre(self, node, frame, finalize) -> None:
        super()._output_child_pre(node, frame, finalize)  # str(
        self.write("environment.budget_output(")

    def _output_child_post(self, node, frame, finalize) -> None:
        self.write(")")
        super()._output_child_post(node, frame, finalize)


class _BudgetedEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox, set up as transformers sets it up for chat templates (trim_blocks,
    lstrip_blocks, loop controls, ``raise_exception``, ``strftime_now``, a ``tojson`` that does not
    escape HTML), with every step of a render charged to the budget of the render in progress."""

    code_generator_class = _BudgetedCodeGenerator
    intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})

    def __init__(self, max_call_depth: int):
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        self.max_call_depth = max_call_depth
        self._current = threading.local()  # the budget of the render running in this thread
        self.globals.pop("lipsum", None)  # generates unbounded text; no chat template uses it
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = _strftime_now
        self.filters["tojson"] = _tojson
        self.filters = {name: self._guarded(name, f) for name, f in self.filters.items()}
        self.tests = {name: self._guarded(name, f) for name, f in self.tests.items()}

    @contextmanager
    def budget(self, seconds: float, chars: int) -> Iterator[_Budget]:
        self._current.budget = _Budget(seconds, chars, self.max_call_depth)
        try:
            yield self._current.budget
        finally:
            self._current.budget = None

    def _active(self) -> _Budget | None:
        return getattr(self._current, "budget", None)

    def _needed(self) -> _Budget:
        budget = self._active()
        if budget is None:
            raise ChatTemplateError("templates render through JinjaChatFormat.render_text (it sets the budget)")
        return budget

    def _guarded(self, name: str, f):
        @wraps(f)  # keeps jinja's pass_context/pass_environment marks
        def guarded(*args, **kwargs):
            budget = self._active()
            if budget is None:  # jinja folding constants at compile time: leave it to the render
                raise ChatTemplateError("no render in progress")
            budget.tick()
            if name == "join":  # weigh what a generator would yield before joining it
                args = tuple(budget.listed(a) for a in args)
            plain = [a for a in args if not _is_jinja_internal(a)]
            if plain:
                budget.filter(name, plain[0], plain[1:], kwargs)
            return budget.value(f(*args, **kwargs))
        return guarded

    # ---- hooks called by sandboxed template code
    def call(self, context, obj, /, *args, **kwargs):
        budget = self._active()
        if budget is not None:
            budget.tick()
            budget.arguments(args, kwargs)
            target = getattr(obj, "__wrapped__", obj)  # str.format arrives wrapped by the sandbox
            if isinstance(getattr(target, "__self__", None), str):
                if target.__name__ == "join":
                    args = tuple(budget.listed(a) for a in args)
                budget.method(target.__name__, target.__self__, args, kwargs)
            if budget.depth >= budget.max_depth:
                raise ChatTemplateError(f"the chat template nested calls more than {budget.max_depth} deep")
            budget.depth += 1
        try:
            result = super().call(context, obj, *args, **kwargs)
        finally:
            if budget is not None:
                budget.depth -= 1
        return budget.value(result) if budget is not None else result

    def call_binop(self, context, operator: str, left, right):
        budget = self._needed()
        budget.tick()
        budget.binop(operator, left, right)
        return budget.value(super().call_binop(context, operator, left, right))

    def getattr(self, obj, attribute):
        budget = self._active()
        if budget is not None:
            budget.tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        budget = self._active()
        if budget is not None:
            budget.tick()
        return super().getitem(obj, argument)

    def budget_iter(self, iterable):
        budget = self._needed()
        for item in iterable:
            budget.tick()
            yield item

    def budget_concat(self, parts) -> str:
        budget = self._needed()
        budget.weight(list(parts), "a concatenation")
        return "".join(map(str, parts))

    def budget_output(self, value):
        return self._needed().output(value)


def _is_jinja_internal(value) -> bool:
    """The context/environment jinja passes first to filters marked pass_context and the like."""
    from jinja2.nodes import EvalContext
    from jinja2.runtime import Context

    return isinstance(value, (Context, EvalContext, ImmutableSandboxedEnvironment))


def _raise_exception(message: str):
    text = message[:500] if isinstance(message, str) else reprlib.repr(message)
    raise ChatTemplateError(f"the chat template raised: {text}")


def _strftime_now(fmt: str) -> str:
    if not isinstance(fmt, str) or len(fmt) > 256:
        raise ChatTemplateError("strftime_now takes a format string of at most 256 characters")
    return datetime.datetime.now().strftime(fmt)


def _tojson(value, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False):
    """transformers' tojson: plain JSON (jinja's own escapes <, >, & and ' for HTML)."""
    if indent is not None and not (isinstance(indent, int) and 0 <= indent <= MAX_JSON_INDENT):
        raise ChatTemplateError(f"tojson indent must be an integer in [0, {MAX_JSON_INDENT}], got {indent!r}")
    if separators is not None and sum(len(str(s)) for s in separators) > 2 * MAX_JSON_INDENT:
        raise ChatTemplateError("tojson separators are too long")
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
