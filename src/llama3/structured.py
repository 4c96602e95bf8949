"""Structured output by constrained decoding: JSON schemas, any JSON object, regexes and grammars.

A ``GrammarConstraint`` is a logits processor (``llama3.processors``): at each step it asks the
grammar which tokens may come next and sets every other logit to -inf, so whatever the sampler
picks keeps the output inside the language; once the grammar is complete only the end-of-turn
tokens remain, and ``is_finished()`` tells the loop to stop. The output then parses, and
validates against the schema, every time (unless ``max_tokens`` cuts it short: finish_reason
"length").

    c = GrammarConstraint.json_schema(llm.tokenizer, {"type": "object", ...})   # or a pydantic model
    c = GrammarConstraint.json_object(llm.tokenizer)                            # any JSON object
    c = GrammarConstraint.regex(llm.tokenizer, r"\\d{3}-\\d{4}")
    c = GrammarConstraint.grammar(llm.tokenizer, 'root ::= "yes" | "no"')       # GBNF or Lark

A bad schema, regex or grammar raises ``GrammarError`` (a ValueError) naming the problem.

The library: llguidance, chosen over xgrammar (both are made for this; vLLM and SGLang ship
both, llama.cpp uses llguidance). Measured here with ``python benchmarks/structured.py --compare``
(random walks through 21 JSON schemas, 10 per schema and vocabulary, every finished output checked
with ``jsonschema``; mask cost in CPU time of the calling thread, median / mean; AMD EPYC, 2 cores,
a busy shared machine):

===========================  ===================================  ===================================
                             llguidance 1.9.1                     xgrammar 0.2.8
===========================  ===================================  ===================================
JSON-schema features         0 invalid of 387 outputs; refuses    22 invalid of 395: ignores allOf
                             uniqueItems (GrammarError)           (with a warning), uniqueItems
mask + apply, SmolLM2 49k    0.047 / 0.069 ms per token           0.033 / 0.051 ms per token
mask + apply, Llama 3 128k   0.108 / 0.173 ms per token           0.079 / 0.161 ms per token
compile a schema (median)    0.7 ms (SmolLM2), 0.8 ms (Llama 3)   13 ms, 30 ms (up to 383 ms)
tokenizer set-up, Llama 3    1.5 s once per tokenizer (cached)    0.24 s
special tokens in text       never (ids marked special)           253 of Llama 3's allowed inside a
                                                                  JSON string (vocabulary as bytes)
install                      7.6 MB, no dependencies              3.8 MB + tvm-ffi 13 MB; requires
                                                                  torch, transformers and triton
license, upkeep              MIT, Microsoft (guidance-ai);        Apache-2.0, MLC; last release
                             last release 2026-09                 2026-09
===========================  ===================================  ===================================

Both are fast enough by far (the budget is 0.5 ms per token against a ~5.7 ms decode step).
llguidance wins on what matters here: it never let an invalid output through and says so when a
keyword cannot be enforced (a "strict" schema is then really enforced, or refused with a 400),
where xgrammar silently drops ``allOf`` and ``uniqueItems``; it compiles a schema in about a
millisecond (the server compiles one per request); it needs nothing else installed (xgrammar's
wheel requires torch, transformers and triton, a second torch being exactly what this project
must not pull in); it takes llama.cpp's GBNF as well as Lark; and told which ids are special, it
keeps ``<|eot_id|>``, ``<|python_tag|>`` and the like out of any text a grammar allows, where
xgrammar given our vocabulary as bytes let them into JSON strings.

JSON whitespace is limited as llama.cpp's json-schema-to-grammar does (nothing, one space, or
one or two newlines and up to 20 spaces or tabs between tokens): small models otherwise tend to
pad with endless whitespace, which a grammar that allows any amount cannot stop.
"""

from __future__ import annotations

import json
import threading
import weakref
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .tokenizer import Tokenizer

# Where JSON allows whitespace: nothing, " ", or 1-2 newlines and an indent of up to 20 (llama.cpp's rule).
JSON_WHITESPACE = r"[ ]|\n{1,2}[ \t]{0,20}"
NEG_INF = float("-inf")
# Any JSON object, spelled out so that bound_numbers reaches the numbers in it.
ANY_JSON_OBJECT = {"$defs": {"value": {"anyOf": [
    {"type": "string"}, {"type": "number"}, {"type": "boolean"}, {"type": "null"},
    {"type": "array", "items": {"$ref": "#/$defs/value"}},
    {"type": "object", "additionalProperties": {"$ref": "#/$defs/value"}}]}},
    "type": "object", "additionalProperties": {"$ref": "#/$defs/value"}}


class GrammarError(ValueError):
    """A schema, regex or grammar that cannot be used; ``kind`` is "json_schema", "regex" or "grammar"."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind


class GrammarStateError(RuntimeError):
    """The constraint cannot go on (a token it forbids was fed to it, or it allows no token at all)."""


# ------------------------------------------------------------------------ tokenizer info
class _TokenizerView:
    """What llguidance's ``TokenizerWrapper`` reads from a tokenizer: every token's bytes, which
    ids are special (llguidance marks them so grammars never spell them out of text), and an
    encode function."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokens = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        self.special_token_ids = sorted(set(tokenizer.special_tokens.values()))
        self.eos_token_id = tokenizer.eos_id if tokenizer.eos_id is not None else min(tokenizer.stop_ids, default=0)
        self.bos_token_id = tokenizer.bos_id
        self._encode = tokenizer.encode

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._encode(text)


_LL_TOKENIZERS: "weakref.WeakKeyDictionary[Tokenizer, Any]" = weakref.WeakKeyDictionary()
_LL_LOCK = threading.Lock()


def ll_tokenizer(tokenizer: Tokenizer):
    """llguidance's view of our tokenizer (built once per tokenizer, ~0.1-0.3 s, then cached)."""
    import llguidance

    with _LL_LOCK:
        found = _LL_TOKENIZERS.get(tokenizer)
        if found is None:
            if not tokenizer.stop_ids:
                raise ValueError(f"{tokenizer.path}: the tokenizer has no end-of-turn token to end constrained output")
            found = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_TokenizerView(tokenizer)),
                                           n_vocab=tokenizer.vocab_size, eos_token=sorted(tokenizer.stop_ids))
            _LL_TOKENIZERS[tokenizer] = found
        return found


# ------------------------------------------------------------------------ the constraint
class GrammarConstraint:
    """A logits processor that keeps the output inside a grammar (see the module docstring).

    One constraint follows one sequence; for several (``n > 1``), ``copy()`` an unused one.
    """

    def __init__(self, tokenizer: Tokenizer, grammar: str, kind: str):
        """``grammar`` is llguidance's grammar (what ``llguidance.grammar_from`` returns); prefer
        the named constructors."""
        import llguidance

        self.tokenizer, self.kind = tokenizer, kind
        self._ll = ll_tokenizer(tokenizer)
        matcher = llguidance.LLMatcher(self._ll, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(kind, _first_lines(matcher.get_error()))
        self._init_state(matcher)

    def _init_state(self, matcher) -> None:
        self._matcher = matcher
        self._consumed = 0
        self._n = self.tokenizer.vocab_size
        self._mask = torch.zeros((self._n + 31) // 32, dtype=torch.int32)  # one bit per token
        self._mask_bytes = self._mask.numpy().view(np.uint8)

    # -------------------------------------------------------------- constructors
    @classmethod
    def json_schema(cls, tokenizer: Tokenizer, schema: Mapping | str | type,
                    strict: bool = True) -> "GrammarConstraint":
        """Output that validates against a JSON schema (a dict, a JSON string, or a pydantic model class).

        ``strict=True`` (OpenAI's ``strict``): every keyword must be enforced, else GrammarError
        (e.g. ``uniqueItems``), and objects that list ``properties`` without saying otherwise get
        ``additionalProperties: false``, as in OpenAI's and xgrammar's strict modes (the output
        still validates against the schema as given). ``strict=False``: JSON Schema's own
        defaults, and keywords the library cannot enforce are ignored. Either way numbers are
        bounded (``bound_numbers``).
        """
        import llguidance

        schema = bound_numbers(_schema_dict(schema))
        if strict:
            schema = close_objects(schema)
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                schema, defaults={"whitespace_pattern": JSON_WHITESPACE}, overrides={"lenient": not strict})
        except ValueError as e:
            raise GrammarError("json_schema", str(e)) from None
        return cls(tokenizer, grammar, "json_schema")

    @classmethod
    def json_object(cls, tokenizer: Tokenizer) -> "GrammarConstraint":
        """Any JSON object (OpenAI's ``response_format: {"type": "json_object"}``)."""
        return cls.json_schema(tokenizer, ANY_JSON_OBJECT, strict=False)

    @classmethod
    def regex(cls, tokenizer: Tokenizer, pattern: str) -> "GrammarConstraint":
        """Output that matches ``pattern`` as a whole (Rust regex syntax: no look-around, no back-references)."""
        import llguidance

        if not isinstance(pattern, str) or not pattern:
            raise GrammarError("regex", "give a non-empty regular expression string")
        return cls(tokenizer, llguidance.LLMatcher.grammar_from_regex(pattern), "regex")

    @classmethod
    def grammar(cls, tokenizer: Tokenizer, text: str) -> "GrammarConstraint":
        """Output in the language of a grammar: llama.cpp's GBNF (``root ::= ...``) or Lark (``start: ...``)."""
        import llguidance

        if not isinstance(text, str) or not text.strip():
            raise GrammarError("grammar", "give a non-empty GBNF or Lark grammar")
        try:
            grammar = llguidance.grammar_from("grammar", text)
        except ValueError as e:
            raise GrammarError("grammar", str(e).removeprefix("Failed to convert the grammar from GBNF to Lark: ")) \
                from None
        return cls(tokenizer, grammar, "grammar")

    # -------------------------------------------------------------- the processor protocol
    def __call__(self, token_ids: Sequence[int] | None, logits: torch.Tensor) -> torch.Tensor:
        """Logits with every token the grammar forbids next set to -inf (a new tensor)."""
        if token_ids is not None and len(token_ids) != self._consumed:
            raise GrammarStateError(f"the sequence has {len(token_ids)} generated tokens but the constraint was told "
                                    f"of {self._consumed}: call accept() for every chosen token")
        self._matcher.unsafe_compute_mask_ptr(self._mask.data_ptr(), self._mask_bytes.size)
        if self._matcher.is_error():
            raise GrammarStateError(f"{self.kind}: {_first_lines(self._matcher.get_error())}")
        if not self._mask_bytes.any():
            raise GrammarStateError(f"{self.kind}: the grammar allows no token here")
        # numpy, not torch: one thread, so no OpenMP barrier can stall a step on a busy machine (~70 us for 128k)
        allowed = np.unpackbits(self._mask_bytes, count=self._n, bitorder="little").view(bool)
        row = logits.detach().to("cpu", torch.float32).numpy()
        if row.shape[-1] != self._n:  # a model whose output rows are padded past the vocabulary
            allowed = np.pad(allowed, (0, row.shape[-1] - self._n))
        return torch.from_numpy(np.where(allowed, row, np.float32(NEG_INF)))

    def accept(self, token_id: int) -> None:
        if not self._matcher.consume_token(int(token_id)):
            raise GrammarStateError(f"{self.kind}: token {token_id} ({self.tokenizer.decode([int(token_id)])!r}) "
                                    f"breaks the grammar: {_first_lines(self._matcher.get_error())}")
        self._consumed += 1

    def is_finished(self) -> bool:
        """The output is complete: no token but an end-of-turn one could follow."""
        return self._matcher.is_stopped()

    def is_complete(self) -> bool:
        """The output so far is a whole sentence of the grammar (it may still go on)."""
        return self._matcher.is_accepting()

    def copy(self) -> "GrammarConstraint":
        """A constraint in the same state, to follow another sequence."""
        other = object.__new__(type(self))
        other.tokenizer, other.kind, other._ll = self.tokenizer, self.kind, self._ll
        other._init_state(self._matcher.deep_copy())
        other._consumed = self._consumed
        return other

    def __repr__(self) -> str:
        return f"GrammarConstraint({self.kind}, {self._consumed} tokens accepted)"


# ------------------------------------------------------------------------ schema helpers
def _schema_dict(schema) -> dict:
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):  # a pydantic model class
        schema = schema.model_json_schema()
    if isinstance(schema, (str, bytes)):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise GrammarError("json_schema", f"the schema is not valid JSON: {e}") from None
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, Mapping):
        raise GrammarError("json_schema", f"a schema must be a JSON object, got {type(schema).__name__}")
    return dict(schema)


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("prefixItems", "anyOf", "oneOf", "allOf", "items")
_SCHEMA_ONES = ("items", "additionalProperties", "additionalItems", "contains", "not", "if", "then", "else",
                "propertyNames", "unevaluatedItems", "unevaluatedProperties")


def _rewrite(schema: Any, fix, in_all_of: bool = False) -> Any:
    """A copy of ``schema`` with ``fix(subschema, in_all_of)`` applied to every subschema, innermost first."""
    if not isinstance(schema, Mapping):
        return schema
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), Mapping):
            out[key] = {name: _rewrite(s, fix) for name, s in out[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [_rewrite(s, fix, in_all_of or key == "allOf") for s in out[key]]
    for key in _SCHEMA_ONES:
        if isinstance(out.get(key), Mapping):
            out[key] = _rewrite(out[key], fix)
    return fix(out, in_all_of)


def close_objects(schema: Any) -> Any:
    """A copy of ``schema`` with ``additionalProperties: false`` on every object schema that lists
    ``properties`` and leaves additional ones unsaid. Branches of ``allOf`` (and objects with one) stay
    open: an intersection of closed objects with different properties would admit nothing."""
    def fix(node, in_all_of):
        open_keys = ("additionalProperties", "patternProperties", "unevaluatedProperties", "allOf")
        if isinstance(node.get("properties"), Mapping) and not in_all_of and not any(k in node for k in open_keys):
            node["additionalProperties"] = False
        return node
    return _rewrite(schema, fix)


# llama.cpp's json-schema-to-grammar caps a number at 16 integer and 16 decimal digits; JSON Schema has
# no such keyword, so bounds say it: |x| <= 1e15 (15 digits) and multipleOf 1e-10 (10 decimals).
NUMBER_LIMIT, NUMBER_STEP = 1e15, 1e-10


def bound_numbers(schema: Any) -> Any:
    """A copy of ``schema`` in which numbers cannot run on: wherever a number or an integer is allowed,
    ``minimum``/``maximum`` of -/+1e15 unless bounds are given, and for numbers ``multipleOf`` 1e-10 unless
    one is given. Only numbers the schema allows remain (it is a restriction), and a sampled number can no
    longer grow digit by digit until max_tokens, which small models otherwise do."""
    def fix(node, in_all_of):
        types = node.get("type")
        types = types if isinstance(types, list) else [types]
        if "number" not in types and "integer" not in types:
            return node
        low = node.get("minimum", node.get("exclusiveMinimum"))
        high = node.get("maximum", node.get("exclusiveMaximum"))
        if low is None and (not isinstance(high, (int, float)) or high > -NUMBER_LIMIT):
            node["minimum"] = -NUMBER_LIMIT
        if high is None and (not isinstance(low, (int, float)) or low < NUMBER_LIMIT):
            node["maximum"] = NUMBER_LIMIT
        if "number" in types and "multipleOf" not in node:
            node["multipleOf"] = NUMBER_STEP
        return node
    return _rewrite(schema, fix)


def _first_lines(message: str, n: int = 6) -> str:
    lines = [line for line in message.strip().splitlines() if line.strip()]
    return "\n".join(lines[:n])


# ------------------------------------------------------------------------------- one prompt
def generate_with_processor(llm, prompt: Sequence[int], processor, *, max_new_tokens: int = 256,
                            **sampling) -> tuple[list[int], str]:
    """Generate for one prompt (token ids) through the engine with ``processor`` applied at every step;
    returns (token ids without the end-of-turn token, finish_reason)."""
    from .sampling import SamplingParams

    params = SamplingParams(max_new_tokens=max_new_tokens, **sampling)
    out, reason = [], "length"
    for step in llm.generator.run([list(prompt)], params, processors=[processor]):
        if step.token_id not in llm.tokenizer.stop_ids:
            out.append(step.token_id)
        reason = step.finish_reason or reason
    return out, reason


# ------------------------------------------------------------------------------- from options
def processors_for(tokenizer: Tokenizer, *, json_schema: Mapping | str | type | None = None, strict: bool = True,
                   json_object: bool = False, regex: str | None = None, grammar: str | None = None,
                   logit_bias: Mapping | None = None, tools: Sequence[dict] | None = None,
                   tool_choice: str | dict | None = None, chat_format=None) -> list:
    """The logits processors for one sequence from the output options that the Python API, the CLI and
    the server take: ``logit_bias`` (``LogitBias``) first, then at most one constraint: ``json_schema``
    (with ``strict``), ``json_object``, ``regex``, ``grammar``, or a tool call that ``tool_choice``
    "required" or ``{"type": "function", "function": {"name": ...}}`` demands of ``tools`` (written
    as ``chat_format``'s model writes calls; "auto" and "none" constrain nothing).

    Build a new list for every sequence: a grammar follows one sequence. ValueError (GrammarError
    for a schema, regex or grammar) names what is wrong."""
    from .processors import LogitBias
    from .tools import check_tool_choice, check_tools, tool_call_constraint

    given = [name for name, value in (("json_schema", json_schema), ("json_object", json_object or None),
                                      ("regex", regex), ("grammar", grammar)) if value is not None]
    calls = None
    if tools:
        tools = check_tools(tools)
        if check_tool_choice(tool_choice, tools) not in ("none", "auto"):
            given.append(f"tool_choice {tool_choice!r}")
            calls = tool_call_constraint(tokenizer, chat_format, tools, tool_choice)
    elif tool_choice not in (None, "none", "auto"):
        raise ValueError(f"tool_choice {tool_choice!r} needs tools")
    if len(given) > 1:
        raise ValueError(f"give one output constraint, not {' and '.join(given)}")
    out = [LogitBias(logit_bias, tokenizer.vocab_size)] if logit_bias else []
    if json_schema is not None:
        out.append(GrammarConstraint.json_schema(tokenizer, json_schema, strict=strict))
    elif json_object:
        out.append(GrammarConstraint.json_object(tokenizer))
    elif regex is not None:
        out.append(GrammarConstraint.regex(tokenizer, regex))
    elif grammar is not None:
        out.append(GrammarConstraint.grammar(tokenizer, grammar))
    elif calls is not None:
        out.append(calls)
    return out
