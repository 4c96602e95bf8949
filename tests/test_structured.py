"""Logits processors and constrained decoding: logit_bias, JSON schemas, regexes and grammars.

The token masks are checked against a brute-force reference (every vocabulary entry tested with
Python's ``re``), and real generations of the default model, greedy and sampled over many seeds,
are parsed and validated with ``jsonschema`` / ``re`` / pydantic: every output must be valid.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from helpers import llama3_tokenizer_dir, smollm2_path
from llama3.processors import LogitBias, LogitsProcessor, ProcessorList
from llama3.structured import GrammarConstraint, GrammarError, GrammarStateError, bound_numbers, close_objects, \
    generate_with_processor
from llama3.tokenizer import load_tokenizer

SEEDS = range(1, 9)  # sampled runs per schema, besides the greedy one


@pytest.fixture(scope="module")
def smol_tokenizer():
    return load_tokenizer(smollm2_path())


@pytest.fixture(scope="module")
def llama_tokenizer():
    return load_tokenizer(llama3_tokenizer_dir() + "/tokenizer.model")


def allowed_ids(constraint: GrammarConstraint, n: int) -> set[int]:
    out = constraint(None, torch.zeros(n))
    return set(torch.nonzero(torch.isfinite(out)).flatten().tolist())


# ------------------------------------------------------------------------------ logit_bias
@pytest.mark.parametrize("bias, message", [
    ({5: 101}, r"logit_bias\[5\] = 101 must be a number in \[-100, 100\]"),
    ({5: -100.5}, r"\[-100, 100\]"),
    ({5: float("nan")}, r"\[-100, 100\]"),
    ({5: True}, r"\[-100, 100\]"),
    ({"abc": 1}, r"logit_bias key 'abc' is not a token id"),
    ({-3: 1}, r"logit_bias key -3 is not a token id"),
    ({1000: 1}, r"logit_bias key 1000 is not a token id in \[0, 1000\)"),
])
def test_logit_bias_rejects_bad_values(bias, message):
    with pytest.raises(ValueError, match=message):
        LogitBias(bias, vocab_size=1000)


def test_logit_bias_adds_bans_and_leaves_the_input_alone():
    logits = torch.tensor([1.0, 2.0, 3.0, 4.0])
    bias = LogitBias({"0": 10, 1: -100, 3: -0.5})  # a JSON key is a string
    assert isinstance(bias, LogitsProcessor)
    out = bias([], logits)
    assert out.tolist() == [11.0, float("-inf"), 3.0, 3.5]
    assert logits.tolist() == [1.0, 2.0, 3.0, 4.0]
    assert not bias.is_finished()


def test_logit_bias_bans_and_forces_on_the_real_model(smollm2_fast):
    llm = smollm2_fast
    _, prompt = llm.chat_prompt([{"role": "user", "content": "What is the capital of France?"}])
    plain, _ = generate_with_processor(llm, prompt, ProcessorList([]), max_new_tokens=12, temperature=0)
    banned = plain[:3]  # the words the model wants most
    out, _ = generate_with_processor(llm, prompt, LogitBias({t: -100 for t in banned}, llm.tokenizer.vocab_size),
                                     max_new_tokens=12, temperature=0)
    assert out and not set(out) & set(banned)
    forced = llm.tokenizer.encode(" banana")[0]
    for seed in (1, 2, 3):
        out, _ = generate_with_processor(llm, prompt, LogitBias({forced: 100}), max_new_tokens=5, seed=seed)
        assert out == [forced] * 5


# ------------------------------------------------------------------------------ the masks
@pytest.mark.parametrize("which", ["smol", "llama"])
def test_regex_mask_equals_brute_force(which, smol_tokenizer, llama_tokenizer):
    """Allowed next tokens for the regex [0-9]{1,3}, against every vocabulary entry tested by hand."""
    tok = smol_tokenizer if which == "smol" else llama_tokenizer
    special = set(tok.special_tokens.values())

    def expect(prefix: str) -> set[int]:
        ids = {i for i in range(tok.vocab_size) if i not in special and tok.token_bytes(i)
               and re.fullmatch(rb"[0-9]{1,3}", prefix.encode() + tok.token_bytes(i))}
        return ids | (set(tok.stop_ids) if re.fullmatch(r"[0-9]{1,3}", prefix) else set())

    c = GrammarConstraint.regex(tok, "[0-9]{1,3}")
    assert allowed_ids(c, tok.vocab_size) == expect("")
    for t in tok.encode("12"):  # one token or two, depending on the vocabulary
        c.accept(t)
    assert allowed_ids(c, tok.vocab_size) == expect("12")
    assert c.is_complete() and not c.is_finished()
    c.accept(tok.encode("7")[0])
    assert allowed_ids(c, tok.vocab_size) == set(tok.stop_ids)
    assert c.is_finished()


def test_special_tokens_never_spelled_inside_json(llama_tokenizer):
    tok = llama_tokenizer
    c = GrammarConstraint.json_schema(tok, {"type": "object", "properties": {"s": {"type": "string"}},
                                            "required": ["s"]})
    for t in tok.encode('{"s": "abc'):
        c.accept(t)
    allowed = allowed_ids(c, tok.vocab_size)
    assert len(allowed) > 100_000  # inside a string nearly any text goes...
    assert not allowed & set(tok.special_tokens.values())  # ...but never <|eot_id|>, <|python_tag|>, ...
    for t in tok.encode('"}'):
        c.accept(t)
    assert allowed_ids(c, tok.vocab_size) == set(tok.stop_ids) and c.is_finished()


def test_accept_and_bookkeeping_errors(smol_tokenizer):
    tok = smol_tokenizer
    c = GrammarConstraint.regex(tok, "yes|no")
    with pytest.raises(GrammarStateError, match="breaks the grammar"):
        c.accept(tok.encode("maybe")[0])
    c = GrammarConstraint.regex(tok, "yes|no")
    with pytest.raises(GrammarStateError, match="call accept"):
        c([1, 2], torch.zeros(tok.vocab_size))


def test_copy_follows_its_own_sequence(smol_tokenizer):
    tok = smol_tokenizer
    base = GrammarConstraint.regex(tok, "(cat|dog)s?")
    a, b = base.copy(), base.copy()
    for t in tok.encode("cat"):
        a.accept(t)
    for t in tok.encode("dog"):
        b.accept(t)
    s = tok.encode("s")[0]
    assert s in allowed_ids(a, tok.vocab_size) and s in allowed_ids(b, tok.vocab_size)
    assert allowed_ids(base, tok.vocab_size) == allowed_ids(GrammarConstraint.regex(tok, "(cat|dog)s?"),
                                                            tok.vocab_size)


def test_bias_cannot_force_what_the_grammar_forbids(smol_tokenizer):
    tok = smol_tokenizer
    x = tok.encode("x")[0]
    both = ProcessorList([LogitBias({x: 100}), GrammarConstraint.regex(tok, "[0-9]+")])
    out = both([], torch.zeros(tok.vocab_size))
    assert out[x] == float("-inf") and torch.isfinite(out[tok.encode("5")[0]])


def test_padded_logits_rows_mask_the_padding(smol_tokenizer):
    tok = smol_tokenizer
    out = GrammarConstraint.regex(tok, "a")(None, torch.zeros(tok.vocab_size + 64))
    assert out.shape == (tok.vocab_size + 64,) and torch.isinf(out[tok.vocab_size:]).all()


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("make, message", [
    (lambda t: GrammarConstraint.json_schema(t, {"type": "strin"}), "json_schema: Invalid type: strin"),
    (lambda t: GrammarConstraint.json_schema(t, "{not json"), "json_schema: the schema is not valid JSON"),
    (lambda t: GrammarConstraint.json_schema(t, [1, 2]), "json_schema: a schema must be a JSON object, got list"),
    (lambda t: GrammarConstraint.json_schema(t, {"$ref": "#/$defs/missing"}), "does not exist"),
    (lambda t: GrammarConstraint.json_schema(t, {"type": "array", "uniqueItems": True}), "uniqueItems"),
    (lambda t: GrammarConstraint.json_schema(t, {"type": "string", "pattern": "a(b"}), "unclosed group"),
    (lambda t: GrammarConstraint.regex(t, "a(b"), "(?s)regex: .*unclosed group"),
    (lambda t: GrammarConstraint.regex(t, ""), "regex: give a non-empty"),
    (lambda t: GrammarConstraint.grammar(t, 'root ::= item\n'), "grammar: Rule 'item' not found"),
    (lambda t: GrammarConstraint.grammar(t, 'root ::= "a" ('), "grammar: Expected '\\)'"),
])
def test_bad_grammars_raise_grammar_error(make, message, smol_tokenizer):
    with pytest.raises(GrammarError, match=message) as e:
        make(smol_tokenizer)
    assert isinstance(e.value, ValueError) and e.value.kind in ("json_schema", "regex", "grammar")


def test_non_strict_ignores_keywords_it_cannot_enforce(smol_tokenizer):
    GrammarConstraint.json_schema(smol_tokenizer, {"type": "array", "uniqueItems": True}, strict=False)


def test_strict_closes_objects_but_not_allof_branches():
    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {}}},
                                               "m": {"type": "object", "additionalProperties": {"type": "integer"}}},
              "$defs": {"d": {"properties": {"x": {}}}},
              "allOf": [{"properties": {"y": {}}}]}
    closed = close_objects(schema)
    assert "additionalProperties" not in closed  # it has allOf: an intersection stays open
    assert closed["properties"]["a"]["additionalProperties"] is False
    assert closed["properties"]["m"]["additionalProperties"] == {"type": "integer"}
    assert closed["$defs"]["d"]["additionalProperties"] is False
    assert "additionalProperties" not in closed["allOf"][0]
    assert "additionalProperties" not in schema["properties"]["a"]  # the caller's schema is untouched


def test_numbers_are_bounded_as_llama_cpp_does(smol_tokenizer):
    schema = {"type": "object", "properties": {"x": {"type": "number"}, "n": {"type": ["integer", "null"], "minimum": 0},
                                               "p": {"type": "number", "maximum": 1, "multipleOf": 0.5},
                                               "s": {"type": "string"}}}
    bounded = bound_numbers(schema)["properties"]
    assert bounded["x"] == {"type": "number", "minimum": -1e15, "maximum": 1e15, "multipleOf": 1e-10}
    assert bounded["n"] == {"type": ["integer", "null"], "minimum": 0, "maximum": 1e15}
    assert bounded["p"] == {"type": "number", "maximum": 1, "multipleOf": 0.5, "minimum": -1e15}
    assert bounded["s"] == {"type": "string"} and schema["properties"]["x"] == {"type": "number"}
    tok = smol_tokenizer
    cases = [(GrammarConstraint.json_schema(tok, {"type": "number"}), "19.12345678901234"),
             (GrammarConstraint.json_object(tok), '{"a": 19.12345678901234')]
    for c, text in cases:
        accepted = ""
        for ch in text:  # character by character, so that the cut shows exactly
            try:
                for t in tok.encode(ch):
                    c.accept(t)
            except GrammarStateError:
                break
            accepted += ch
        assert accepted == text[:text.index(".") + 11]  # ten decimals, no more


# ------------------------------------------------------------------------------ real generations
SCHEMAS = {
    "person": {"type": "object", "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.(com|org)$"}},
        "required": ["name", "age", "email"]},
    "shopping list": {"type": "array", "items": {"type": "string", "maxLength": 30}, "minItems": 2, "maxItems": 5},
    "enum and const": {"type": "object", "properties": {"unit": {"enum": ["celsius", "fahrenheit"]},
                                                         "kind": {"const": "reading"},
                                                         "value": {"type": "number", "minimum": -90, "maximum": 60}},
                       "required": ["kind", "unit", "value"]},
    "nested": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 30},
        "location": {"type": "object", "properties": {"lat": {"type": "number", "minimum": -90, "maximum": 90},
                                                      "lon": {"type": "number", "minimum": -180, "maximum": 180}},
                     "required": ["lat", "lon"]},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,12}$"}, "maxItems": 3}},
        "required": ["city", "location", "tags"]},
    "optional and nullable": {"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 40}, "year": {"type": ["integer", "null"]},
        "rating": {"type": "number", "exclusiveMinimum": 0, "maximum": 10}},
        "required": ["title", "rating"]},
    "refs": {"$defs": {"item": {"type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{3}$"},
                                                                 "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                                "required": ["sku", "qty"]}},
             "type": "object", "properties": {"order": {"type": "array", "items": {"$ref": "#/$defs/item"},
                                                        "minItems": 1, "maxItems": 3}},
             "required": ["order"]},
}


def _chat_ids(llm, instruction: str) -> list[int]:
    return llm.chat_prompt([{"role": "user", "content": instruction}])[1]


def _runs():
    """Greedy, then sampled with the default knobs (llama.cpp's) over several seeds. (With the raw
    distribution a small model can append digits to a JSON number until max_tokens: JSON-schema
    grammars bound neither numbers nor strings, so such a run ends with finish_reason "length".)"""
    yield {"temperature": 0}
    for seed in SEEDS:
        yield {"seed": seed}


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_generated_json_always_validates(name, smollm2_fast):
    llm, schema = smollm2_fast, SCHEMAS[name]
    prompt = _chat_ids(llm, f"Write a JSON value ({name}) that follows this JSON schema:\n{json.dumps(schema)}")
    base = GrammarConstraint.json_schema(llm.tokenizer, schema)
    for run in _runs():
        out, reason = generate_with_processor(llm, prompt, base.copy(), max_new_tokens=160, **run)
        text = llm.tokenizer.decode(out)
        assert reason == "stop", (run, text)
        jsonschema.validate(json.loads(text), schema, format_checker=jsonschema.FormatChecker())


def test_json_object_mode(smollm2_fast):
    llm = smollm2_fast
    prompt = _chat_ids(llm, "Describe a cat as a JSON object.")
    for run in _runs():
        out, reason = generate_with_processor(llm, prompt, GrammarConstraint.json_object(llm.tokenizer),
                                              max_new_tokens=200, **run)
        text = llm.tokenizer.decode(out)
        if reason == "stop":  # any object may be long; a finished one must parse
            assert isinstance(json.loads(text), dict), text
        else:
            assert text.startswith("{")


def test_pydantic_model_schema(smollm2_fast):
    from typing import Literal

    from pydantic import BaseModel, Field

    class Address(BaseModel):
        street: str = Field(max_length=40)
        zip_code: str = Field(pattern=r"^[0-9]{5}$")

    class Customer(BaseModel):
        name: str = Field(max_length=30)
        tier: Literal["free", "pro", "enterprise"]
        credits: int = Field(ge=0, le=1000)
        address: Address

    llm = smollm2_fast
    prompt = _chat_ids(llm, "Create a customer record as JSON with name, tier, credits and address.")
    base = GrammarConstraint.json_schema(llm.tokenizer, Customer)  # the class itself: model_json_schema()
    for run in _runs():
        out, reason = generate_with_processor(llm, prompt, base.copy(), max_new_tokens=160, **run)
        text = llm.tokenizer.decode(out)
        assert reason == "stop", text
        Customer.model_validate_json(text)
        jsonschema.validate(json.loads(text), Customer.model_json_schema())


def test_regex_output(smollm2_fast):
    llm = smollm2_fast
    pattern = r"\(?[0-9]{3}\)? [0-9]{3}-[0-9]{4}"
    prompt = _chat_ids(llm, "Give me a US phone number.")
    for run in _runs():
        out, reason = generate_with_processor(llm, prompt, GrammarConstraint.regex(llm.tokenizer, pattern),
                                              max_new_tokens=40, **run)
        text = llm.tokenizer.decode(out)
        assert reason == "stop" and re.fullmatch(pattern, text), text


GBNF = r'''
root   ::= answer " because " reason "."
answer ::= "yes" | "no"
reason ::= [a-z ]{3,60}
'''


def test_gbnf_grammar_output(smollm2_fast):
    llm = smollm2_fast
    prompt = _chat_ids(llm, "Is the sky blue? Answer yes or no, and say why.")
    base = GrammarConstraint.grammar(llm.tokenizer, GBNF)
    for run in _runs():
        out, reason = generate_with_processor(llm, prompt, base.copy(), max_new_tokens=60, **run)
        text = llm.tokenizer.decode(out)
        assert reason == "stop" and re.fullmatch(r"(yes|no) because [a-z ]{3,60}\.", text), text
