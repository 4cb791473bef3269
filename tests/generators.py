"""Building generators on test models, in this process."""

from __future__ import annotations

import io

from torchchat.catalog import ModelSource
from torchchat.chat_format import chat_format_for
from torchchat.checkpoint import load_model, read_model_args
from torchchat.generate.local import LocalGenerator
from torchchat.tokenizer import load_tokenizer


def tiny_source(tiny) -> ModelSource:
    return ModelSource("tiny", checkpoint_path=tiny.checkpoint, tokenizer_path=tiny.tokenizer)


def load_parts(source: ModelSource):
    """(model, tokenizer, chat_format) of a source."""
    tokenizer = load_tokenizer(source)
    model = load_model(source, read_model_args(source))
    return model, tokenizer, chat_format_for(tokenizer, source)


def local_generator(source: ModelSource, max_seq_len: int = 256, **kwargs) -> LocalGenerator:
    model, tokenizer, chat_format = load_parts(source)
    kwargs.setdefault("out", io.StringIO())
    kwargs.setdefault("err", io.StringIO())
    return LocalGenerator(model, tokenizer, chat_format, max_seq_len=max_seq_len, **kwargs)


def scripted_user(lines: list[str]):
    """A read_user function that types these lines, then ends the chat (EOF)."""
    it = iter(lines)
    return lambda: next(it, None)
