"""Texts every tokenizer must give back unchanged, and a ModelSource naming only a tokenizer file; for the tokenizer
tests (test_tokenizer, test_gguf_vocab)."""

from __future__ import annotations

from torchchat.catalog import ModelSource

ROUND_TRIP = ["Hello world", "héllo wörld, naïve café", "emoji 🙂👍🏽 and flags 🇫🇷", "日本語のテキスト",
              "Ελληνικά и русский", "  two leading spaces\n\nblank line\ttab  trailing  ",
              "def f(x):\n    return x ** 2  # square\n", "<|im_end|> [INST] <s></s> <|eot_id|>", ""]


def tokenizer_file(path) -> ModelSource:
    return ModelSource("test", checkpoint_path=path.parent / "model.pth", tokenizer_path=path)
