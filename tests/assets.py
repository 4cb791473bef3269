"""Tiny real assets written by tests: tokenizer files and random-weight checkpoints."""

from __future__ import annotations

import base64
from pathlib import Path


def write_byte_tiktoken(path: Path) -> Path:
    """A Llama 3-format tiktoken file with one token per byte (256 ranks); specials are added on load."""
    lines = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)]
    path.write_text("\n".join(lines) + "\n")
    return path


# ----- tokenizer assets: real files, trained or written here, or shipped by registry packages -----

# Training text for the tiny sentencepiece model: a few paragraphs, plain ASCII, so that byte
# fallback is exercised by anything else (accents, emoji, CJK).
SENTENCEPIECE_TEXT = """\
The quick brown fox jumps over the lazy dog. A tokenizer turns text into numbers, and a model
turns numbers into more numbers. Hello world, hello there, hello again: the world says hello.
In the beginning the model knew nothing; after training it knew a little about the world.
Numbers like 2024 and 1999 are split into digits one at a time. Tokens, tokens everywhere.
She sells sea shells by the sea shore, and the shells she sells are sea shells for sure.
We write tests to find bugs before our users do; then we fix the bugs and write more tests.
"""


def train_sentencepiece(path: Path, vocab_size: int = 320) -> Path:
    """A real sentencepiece BPE model (Llama 2's settings: byte fallback, digits split, identity
    normalizer; <unk>=0, <s>=1, </s>=2) trained on SENTENCEPIECE_TEXT, written to ``path``."""
    import io

    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCEPIECE_TEXT.splitlines()), model_writer=model, model_type="bpe",
        vocab_size=vocab_size, byte_fallback=True, split_digits=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, num_threads=1, minloglevel=2)
    path.write_bytes(model.getvalue())
    return path


def write_gguf_metadata(path: Path, fields: dict) -> Path:
    """A GGUF file holding only metadata (no tensors): str, bool, int (uint32), float and list values."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    add_fields(writer, fields)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return path


def add_fields(writer, fields: dict):
    """Metadata into a gguf.GGUFWriter: str, bool, int (uint32), float and list values."""
    for key, value in fields.items():
        if isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_float32(key, value)


# Meta's chat template for Llama 3 8B Instruct (tokenizer_config.json): contents are trimmed.
LLAMA3_HF_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def sentencepiece_gguf_fields(model_path: Path) -> dict:
    """The GGUF tokenizer metadata (llama.cpp's 'llama' vocabulary) of a sentencepiece model file."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
    n = sp.vocab_size()

    def kind(i):  # llama.cpp's token types: 1 normal, 2 unknown, 3 control, 5 unused, 6 byte
        return 2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 5 if sp.is_unused(i) else 1

    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
            "tokenizer.ggml.scores": [float(sp.get_score(i)) for i in range(n)],
            "tokenizer.ggml.token_type": [kind(i) for i in range(n)],
            "tokenizer.ggml.bos_token_id": sp.bos_id(), "tokenizer.ggml.eos_token_id": sp.eos_id(),
            "tokenizer.ggml.unknown_token_id": sp.unk_id()}


def llama3_tokenizer_model() -> Path | None:
    """Meta's Llama 3 tokenizer.model, shipped by `pip install --no-deps llama-models==0.3.0`."""
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution("llama-models")
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(dist.locate_file("llama_models/llama3/tokenizer.model"))
    return path if path.is_file() else None
