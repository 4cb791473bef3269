"""The command handlers in this process: what `generate` does once, and the one context check."""

import pytest

import torchchat.checkpoint
import torchchat.tokenizer
from torchchat.cli import build_parser
from torchchat.commands import cmd_generate
from torchchat.errors import ContextFull


def _generate_args(tiny_model, *flags):
    return build_parser().parse_args(["generate", *tiny_model.cli_flags(), "--prompt", "Once upon a time",
                                      "--temperature", "0", *flags])


def test_generate_tokenizes_the_prompt_and_reads_the_model_args_once(tiny_model, monkeypatch, capsys):
    calls = {"encode": 0, "read_model_args": 0}
    load_tokenizer, read_model_args = torchchat.tokenizer.load_tokenizer, torchchat.checkpoint.read_model_args

    def counted_tokenizer(source):
        tokenizer = load_tokenizer(source)
        encode = tokenizer.encode

        def counted_encode(*args, **kwargs):
            calls["encode"] += 1
            return encode(*args, **kwargs)
        tokenizer.encode = counted_encode
        return tokenizer

    def counted_read(source):
        calls["read_model_args"] += 1
        return read_model_args(source)

    monkeypatch.setattr(torchchat.tokenizer, "load_tokenizer", counted_tokenizer)
    monkeypatch.setattr(torchchat.checkpoint, "read_model_args", counted_read)
    assert cmd_generate(_generate_args(tiny_model, "--max-new-tokens", "4")) == 0
    assert calls == {"encode": 1, "read_model_args": 1}
    assert capsys.readouterr().out.startswith("Once upon a time")


def test_generate_checks_the_context_before_loading_weights(tiny_model, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the weights were loaded for a prompt that cannot fit")

    monkeypatch.setattr(torchchat.checkpoint, "load_model", no_load)
    args = _generate_args(tiny_model, "--max-seq-length", "8", "--max-new-tokens", "8")
    with pytest.raises(ContextFull, match=r"^prompt \(\d+ tokens\) plus --max-new-tokens \(8\) exceeds the context "
                                          r"\(8\); shorten the prompt or lower --max-new-tokens$"):
        cmd_generate(args)
