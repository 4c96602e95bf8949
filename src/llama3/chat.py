"""Chat formats: Llama 3's header format in code, and jinja2 chat templates in a sandbox.

Both return the prompt as text and as token ids. Message contents are always encoded as
plain text (a user who types ``<|eot_id|>`` cannot end a turn); only the format's own
markup becomes special tokens. There is one BOS, never two.
"""

from __future__ import annotations

import datetime
import uuid
from typing import Mapping, Sequence

from .tokenizer import Tokenizer

Message = Mapping[str, str]
ROLES = ("system", "user", "assistant", "tool", "ipython")


class ChatTemplateError(ValueError):
    """A chat template that cannot be rendered, or one that tried to leave its sandbox."""


def _check_messages(messages: Sequence[Message]) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content'")
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
        ids = [self.tokenizer.bos_id]
        for m in messages:
            ids += self.encode_message(m)
        if add_generation_prompt:
            ids += self.encode_header("assistant")
        return self.tokenizer.decode(ids), ids


class JinjaChatFormat:
    """A Hugging Face / GGUF chat template rendered in jinja2's immutable sandbox.

    Message contents are swapped for unique markers while rendering, so the template's own
    text (its special tokens) and the users' text are encoded separately: the first with
    special tokens allowed, the second as plain text.
    """

    name = "jinja"

    def __init__(self, template: str, tokenizer: Tokenizer, source: str = "chat template"):
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.tokenizer, self.source, self.template_text = tokenizer, source, template
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(template)
        except TemplateError as e:
            raise ChatTemplateError(f"{source}: the chat template does not parse: {e}") from None

        def name_of(token_id):
            return tokenizer.decode([token_id]) if token_id is not None else ""

        self.bos_token, self.eos_token = name_of(tokenizer.bos_id), name_of(tokenizer.eos_id)

    def render_text(self, messages: Sequence[Message], add_generation_prompt: bool = True, **extra) -> str:
        from jinja2 import TemplateError
        from jinja2.exceptions import SecurityError

        try:
            return self.template.render(messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token, **extra)
        except SecurityError as e:
            raise ChatTemplateError(f"{self.source}: the chat template tried to leave its sandbox: {e}") from None
        except ChatTemplateError:
            raise
        except (TemplateError, TypeError, ValueError, KeyError, AttributeError) as e:
            raise ChatTemplateError(f"{self.source}: the chat template failed: {e}") from None

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
                    raise ValueError(f"message content contains special-token text {hits[0]!r}, which this "
                                     "chat template cannot keep apart from its own markup")
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
        for m in self._special_re().finditer(text):
            if any(a < m.end() and m.start() < b for a, b in spans):
                continue
            ids += self.tokenizer.encode(text[start:m.start()]) + [special[m.group()]]
            start = m.end()
        return ids + self.tokenizer.encode(text[start:])

    def _special_re(self):
        import re

        if not hasattr(self, "_special_pattern"):
            names = sorted(self.tokenizer.special_tokens, key=len, reverse=True)
            self._special_pattern = re.compile("|".join(map(re.escape, names)) or "(?!)")
        return self._special_pattern


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


def _raise_exception(message: str):
    raise ChatTemplateError(f"the chat template raised: {message}")


def chat_format_for(tokenizer: Tokenizer, template: str | None, source: str = "chat template"):
    """The model's chat format: its own template, else Llama 3's format if its vocabulary has the
    header tokens, else None (the model has no chat format)."""
    if template:
        return JinjaChatFormat(template, tokenizer, source)
    if all(t in tokenizer.special_tokens for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")):
        return Llama3ChatFormat(tokenizer)
    return None
