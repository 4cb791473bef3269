"""Chat templates: chat messages -> tokens, one turn at a time, so a chat keeps its history in the KV cache.

A chat alternates *turns* (system and/or user messages, then the header that opens the assistant's
reply) and *replies* (what the model generates, up to and including a stop token). ``encode_turn``
gives the tokens of one turn; the generator feeds them, samples the reply, and feeds the stop token
back with the next turn (or ``end_of_turn`` when the reply was cut short by max tokens).

Only a template's own markup may become special tokens: message text goes through
``Tokenizer.encode``, so a user who types ``<|im_end|>`` cannot end a turn.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from torchchat.catalog import ModelSource
from torchchat.errors import ChatFormatError
from torchchat.tokenizer import SentencePieceTokenizer, Tokenizer

log = logging.getLogger(__name__)

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}
ROLES = ("system", "user", "assistant")


class ChatFormat(ABC):
    """Turns chat messages into tokens, one turn at a time, so a chat can keep its history in the KV cache."""

    end_of_turn: list[int]  # tokens that close an assistant reply cut short (by max tokens) before its stop token

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    @abstractmethod
    def encode_turn(self, messages: list[Message], first: bool) -> list[int]:
        """Tokens of ``messages`` (system and/or user) followed by the header that opens the assistant's reply.

        first=True: the start of the conversation (BOS where the format uses one; a default system
        prompt where the template has one and no system message is given). first=False: a later turn;
        the previous reply already ended with its stop token, so this is exactly what follows that token.
        """

    def encode_reply(self, content: str) -> list[int]:
        """Tokens of an assistant reply as the model ends it: its text, then its stop token."""
        return self.tokenizer.encode(content) + self.end_of_turn

    def encode_dialog(self, messages: list[Message]) -> list[int]:
        """A whole conversation ending with the assistant header (for a server request): the
        concatenation of its turns and replies."""
        tokens = []
        for k, (prompt, reply) in enumerate(split_dialog(messages)):
            tokens += self.encode_turn(prompt, first=k == 0)
            if reply is not None:
                tokens += self.encode_reply(reply["content"])
        return tokens


def split_dialog(messages: list[Message]) -> list[tuple[list[Message], Message | None]]:
    """[(the messages of a turn, the assistant reply after it or None)], after checking the messages."""
    check_messages(messages)
    turns, prompt = [], []
    for m in messages:
        if m["role"] != "assistant":
            prompt.append(m)
        elif not prompt:
            raise ChatFormatError("an assistant message must follow a user message")
        else:
            turns.append((prompt, m))
            prompt = []
    if not prompt:
        raise ChatFormatError("the conversation must end with a user message, for the assistant to answer")
    return turns + [(prompt, None)]


def check_messages(messages: list[Message]):
    if not messages:
        raise ChatFormatError("no messages: give at least one user message")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ChatFormatError(f"a message must be {{'role': one of {', '.join(ROLES)}, 'content': text}}, "
                                  f"not {str(m)[:80]}")


@dataclass(frozen=True)
class Text:
    """Message text within a template: encoded with ``Tokenizer.encode``, so never a special token."""

    text: str


def encode_parts(tokenizer: Tokenizer, parts: list[str | Text]) -> list[int]:
    """Template text (``str``: special token strings become ids) and message text (``Text``) -> tokens.

    The ordinary text between two special tokens is encoded in one piece, message text included, so
    that words are tokenized as in the whole string: sentencepiece puts the space before a word into
    the word's token, and a cut at a message boundary would change the tokens.
    """
    runs: list[str | int] = []
    for part in parts:
        for piece in [part.text] if isinstance(part, Text) else tokenizer.split_specials(part):
            if isinstance(piece, str) and runs and isinstance(runs[-1], str):
                runs[-1] += piece
            elif piece != "":
                runs.append(piece)
    tokens = []
    for run in runs:
        tokens += [run] if isinstance(run, int) else tokenizer.encode(run)
    return tokens


def _require(tokenizer: Tokenizer, fmt: str, *names: str) -> list[int]:
    ids = [tokenizer.token_id(name) for name in names]
    missing = [name for name, i in zip(names, ids) if i is None]
    if missing:
        raise ChatFormatError(f"the {fmt} chat format needs the special tokens {', '.join(missing)}, "
                              f"which this tokenizer lacks")
    return ids


class Llama2ChatFormat(ChatFormat):
    """Meta's Llama 2 chat: ``<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {reply}</s>``.

    Each turn is one sentencepiece encode of the whole string, as in Meta's reference (the markup is
    ordinary text in Llama 2's vocabulary). The reply's stop token is EOS; every turn starts with BOS.
    """

    def __init__(self, tokenizer: Tokenizer):
        super().__init__(tokenizer)
        self.end_of_turn = [tokenizer.eos_id]

    def encode_turn(self, messages: list[Message], first: bool) -> list[int]:
        check_messages(messages)
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        user = "\n\n".join(m["content"] for m in messages if m["role"] == "user")
        if system:
            user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}"
        return self.tokenizer.encode(f"[INST] {user.strip()} [/INST]", bos=True)

    def encode_reply(self, content: str) -> list[int]:
        # Meta's reference writes f" {reply} " before EOS; a generated reply ends at EOS without the
        # trailing space, and this must match what the generator left in the KV cache.
        return self.tokenizer.encode(content.strip()) + self.end_of_turn


class Llama3ChatFormat(ChatFormat):
    """Meta's Llama 3 chat: ``<|begin_of_text|>`` then ``<|start_header_id|>{role}<|end_header_id|>\\n\\n
    {content}<|eot_id|>`` per message, then the assistant header. Contents are stripped, as Meta's."""

    def __init__(self, tokenizer: Tokenizer):
        super().__init__(tokenizer)
        *_, eot = _require(tokenizer, "Llama 3", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                           "<|eot_id|>")
        self.end_of_turn = [eot]

    def encode_turn(self, messages: list[Message], first: bool) -> list[int]:
        check_messages(messages)
        parts = ["<|begin_of_text|>" if first else ""]
        for m in messages:
            header = f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
            parts += [header, Text(m["content"].strip()), "<|eot_id|>"]
        return encode_parts(self.tokenizer, parts + ["<|start_header_id|>assistant<|end_header_id|>\n\n"])

    def encode_reply(self, content: str) -> list[int]:
        return self.tokenizer.encode(content.strip()) + self.end_of_turn


class ChatMLFormat(ChatFormat):
    """ChatML: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, then ``<|im_start|>assistant\\n``."""

    def __init__(self, tokenizer: Tokenizer):
        super().__init__(tokenizer)
        _, im_end = _require(tokenizer, "ChatML", "<|im_start|>", "<|im_end|>")
        self.end_of_turn = [im_end]

    def encode_turn(self, messages: list[Message], first: bool) -> list[int]:
        check_messages(messages)
        bos = [self.tokenizer.bos_id] if first and self.tokenizer.add_bos else []
        parts = ["" if first else "\n"]  # the newline after the previous reply's <|im_end|>
        for m in messages:
            parts += [f"<|im_start|>{m['role']}\n", Text(m["content"]), "<|im_end|>\n"]
        return bos + encode_parts(self.tokenizer, parts + ["<|im_start|>assistant\n"])


class RawFormat(ChatFormat):
    """No template (a base model): each turn is its text, joined by newlines; a reply ends at EOS."""

    def __init__(self, tokenizer: Tokenizer):
        super().__init__(tokenizer)
        self.end_of_turn = []  # nothing marks the end of a reply but EOS, which a cut reply lacks

    def encode_turn(self, messages: list[Message], first: bool) -> list[int]:
        check_messages(messages)
        text = "\n".join(m["content"] for m in messages)
        return self.tokenizer.encode(text, bos=first and self.tokenizer.add_bos)

    def encode_reply(self, content: str) -> list[int]:
        return self.tokenizer.encode(content) + [self.tokenizer.eos_id]


class JinjaChatFormat(ChatFormat):
    """A model's own Jinja chat template (GGUF ``tokenizer.chat_template``, Hugging Face's
    ``tokenizer_config.json``), rendered in a sandbox.

    Each message's content is rendered as a unique marker, so the rendered text tells the template's
    markup (where special token strings become ids) from message text (never special tokens); a second
    render with the real contents checks that the template used them as they are (or stripped, for
    templates that ``trim`` them). A later turn is rendered after a stand-in history (a user message and
    a reply): it is what follows the reply's stop token.
    """

    def __init__(self, tokenizer: Tokenizer, template: str):
        super().__init__(tokenizer)
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt))
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        try:
            self._template = env.from_string(template)
        except jinja2.TemplateError as e:
            raise ChatFormatError(f"the model's chat template does not parse: {e}") from None
        names = {i: text for text, i in tokenizer.special_tokens.items()}
        self._vars = {"bos_token": names.get(tokenizer.bos_id, ""), "eos_token": names.get(tokenizer.eos_id, "")}
        self._stop_texts = [names[i] for i in sorted(tokenizer.stop_ids) if i in names]
        self._nonce = uuid.uuid4().hex  # markers a user cannot type by chance
        self._marker = re.compile(rf"\[\[{self._nonce}:(\d+)\]\]")
        # Padded, to see whether the template trims contents.
        self._history = [{"role": "user", "content": " Hi "}, {"role": "assistant", "content": " Hello "}]
        self._probe()

    def encode_turn(self, messages: list[Message], first: bool) -> list[int]:
        check_messages(messages)
        if first:
            return self._with_bos(self._encode(*self._render(messages, True)))
        text, contents = self._render(self._history + messages, True)
        if not text.startswith(self._history_text):
            raise ChatFormatError("the chat template renders earlier messages differently once these follow, "
                                  "so they cannot be encoded as a later turn")
        return self._encode(text[self._after_stop(text):], contents)

    def encode_reply(self, content: str) -> list[int]:
        return self.tokenizer.encode(content.strip() if self._trims else content) + self.end_of_turn

    def encode_dialog(self, messages: list[Message]) -> list[int]:
        """The whole conversation rendered at once: the template's own output. It equals the turns and
        replies joined when the template closes a reply with its stop token right after the content
        (ChatML, Llama 3); Llama 2's writes a space before EOS, which a generated reply lacks."""
        split_dialog(messages)  # checks the messages
        return self._with_bos(self._encode(*self._render(messages, True)))

    # ----- steps -----

    def _probe(self):
        """Finds the stop token that closes a reply, whether contents are trimmed, and checks that a
        later turn renders after the history without changing it."""
        self._history_text, contents = self._render(self._history, False)
        self._trims = contents[1] != self._history[1]["content"]
        after_reply = self._history_text[self._reply_end(self._history_text):].lstrip()
        stop = next((s for s in self._stop_texts if after_reply.startswith(s)), None)
        # A template that closes a reply without a stop token (the model was trained to end with EOS).
        self.end_of_turn = [self.tokenizer.token_id(stop) if stop else self.tokenizer.eos_id]
        later, _ = self._render(self._history + [{"role": "user", "content": "Bye"}], True)
        if not later.startswith(self._history_text):
            raise ChatFormatError("the chat template renders earlier messages differently once a new one "
                                  "follows, so a chat cannot be encoded turn by turn")

    def _reply_end(self, text: str) -> int:
        """Where the stand-in reply's content ends in ``text``."""
        ends = [m.end() for m in self._marker.finditer(text) if m.group(1) == "1"]
        if not ends:
            raise ChatFormatError("the chat template drops assistant messages; torchchat cannot chat with it")
        return ends[-1]

    def _after_stop(self, text: str) -> int:
        """Where a later turn starts: after the stop token that follows the stand-in reply."""
        pos = self._reply_end(text)
        rest = text[pos:]
        for stop in self._stop_texts:
            if rest.lstrip().startswith(stop):
                return pos + rest.index(stop) + len(stop)
        return pos  # no stop token after a reply: the generator fed EOS, the turn starts right after it

    def _render(self, messages: list[Message], generation_prompt: bool) -> tuple[str, list[str]]:
        """The template's text with each content as a marker, and the contents as the template uses them."""
        marked = [{**m, "content": f"[[{self._nonce}:{i}]]"} for i, m in enumerate(messages)]
        text = self._render_text(marked, generation_prompt)
        real = self._render_text(messages, generation_prompt)
        contents = [m["content"] for m in messages]
        for variant in (contents, [c.strip() for c in contents]):
            if self._marker.sub(lambda m: variant[int(m.group(1))], text) == real:
                return text, variant
        raise ChatFormatError("the chat template rewrites message contents, so they cannot be told apart "
                              "from its markup")

    def _render_text(self, messages: list[Message], generation_prompt: bool) -> str:
        try:
            return self._template.render(messages=messages, add_generation_prompt=generation_prompt, **self._vars)
        except jinja2.TemplateError as e:
            raise ChatFormatError(f"the model's chat template failed: {e}") from None

    def _encode(self, text: str, contents: list[str]) -> list[int]:
        pieces = self._marker.split(text)  # markup, message index, markup, message index, ..., markup
        return encode_parts(self.tokenizer, [Text(contents[int(p)]) if k % 2 else p for k, p in enumerate(pieces)])

    def _with_bos(self, tokens: list[int]) -> list[int]:
        tok = self.tokenizer
        return [tok.bos_id, *tokens] if tok.add_bos and tokens[:1] != [tok.bos_id] else tokens


def chat_format_for(tokenizer: Tokenizer, source: ModelSource | None = None) -> ChatFormat:
    """The model's own chat template where it has one, else a built-in format chosen by the
    tokenizer's special tokens: Llama 3, ChatML, Llama 2 (sentencepiece), or none."""
    template = chat_template(source) if source is not None else None
    if template:
        try:
            return JinjaChatFormat(tokenizer, template)
        except ChatFormatError as e:
            log.warning("%s; using a built-in chat format instead", e)
    if all(tokenizer.token_id(t) is not None for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")):
        return Llama3ChatFormat(tokenizer)
    if all(tokenizer.token_id(t) is not None for t in ("<|im_start|>", "<|im_end|>")):
        return ChatMLFormat(tokenizer)
    if isinstance(tokenizer, SentencePieceTokenizer):
        return Llama2ChatFormat(tokenizer)
    return RawFormat(tokenizer)


def chat_template(source: ModelSource) -> str | None:
    """The Jinja chat template shipped with the model's tokenizer: the GGUF's ``tokenizer.chat_template``
    or a Hugging Face directory's ``tokenizer_config.json``. None when the tokenizer is a separate file
    (``--tokenizer-path``): a template belongs with its own vocabulary."""
    if source.tokenizer_path is not None:
        return None
    if source.gguf_path is not None:
        from torchchat.checkpoints.gguf import open_gguf  # the parsed file is shared with the weight loader

        return open_gguf(Path(source.gguf_path)).fields.get("tokenizer.chat_template")
    if source.checkpoint_dir is not None:
        config = Path(source.checkpoint_dir) / "tokenizer_config.json"
        if config.is_file():
            try:
                template = json.loads(config.read_text()).get("chat_template")
            except (OSError, ValueError) as e:
                raise ChatFormatError(f"{config} is not valid JSON ({e}): fix or remove it") from None
            if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
                template = next((t.get("template") for t in template if t.get("name") == "default"), None)
            return template if isinstance(template, str) else None
    return None


def _raise(message: str):
    raise jinja2.TemplateError(message)
