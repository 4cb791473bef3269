"""GGUF vocabularies tokenize as llama.cpp does: its own golden tokenizations (Llama 3, Llama 2, GPT-2,
StarCoder), Meta's Llama 3 tokenizer against the same vocabulary in a GGUF, and small vocabularies whose
merges repeat results, against Hugging Face's BPE (the `tokenizers` package) as an independent oracle."""

from __future__ import annotations

import itertools
import random

import pytest
import tiktoken

from tests import llamacpp_vocab
from tests.assets import llama3_tokenizer_model, write_gguf_metadata
from tests.ci import IN_CI, import_or_skip_outside_ci
from tests.tokenizer_cases import ROUND_TRIP, tokenizer_file
from torchchat.bpe import WordEncoder, byte_to_unicode, tiktoken_is_exact
from torchchat.catalog import ModelSource
from torchchat.tokenizer import (GPT2_PATTERN, MergeRankTokenizer, SentencePieceTokenizer, TiktokenTokenizer,
                                 load_tokenizer)

# The engine each vocabulary takes: tiktoken only where torchchat.bpe.tiktoken_is_exact proves it exact.
ENGINES = {"llama-bpe": MergeRankTokenizer, "llama-spm": SentencePieceTokenizer, "gpt-2": TiktokenTokenizer,
           "starcoder": TiktokenTokenizer}


def require_llamacpp_vocabs():
    if missing := llamacpp_vocab.missing():
        message = f"llama.cpp's test vocabularies are missing ({missing[0]}): python -m tests.llamacpp_vocab"
        if IN_CI:
            pytest.fail(f"{message}, and CI must run these tests", pytrace=False)
        pytest.skip(message)


def gguf_tokenizer(name: str):
    require_llamacpp_vocabs()
    return load_tokenizer(ModelSource(name, gguf_path=llamacpp_vocab.vocab_files(name)[0]))


@pytest.fixture(scope="module")
def llama3_gguf():
    return gguf_tokenizer("llama-bpe")


# ----- llama.cpp's golden tokenizations -----

@pytest.mark.parametrize("name", llamacpp_vocab.NAMES)
def test_llamacpp_golden_tokenizations(name):
    tok = gguf_tokenizer(name)
    assert type(tok) is ENGINES[name]
    cases = llamacpp_vocab.golden_cases(name)
    assert len(cases) >= 40
    wrong = [(text, tok.encode(text), ids) for text, ids in cases if tok.encode(text) != ids]
    assert not wrong, f"{len(wrong)} of {len(cases)} differ from llama.cpp; first: {wrong[0]}"


def test_llama3_gguf_vocabulary_is_metas_tokenizer(llama3_gguf):
    """Llama 3's vocabulary in a GGUF (merges, token types) and Meta's tiktoken file: the same tokenizer."""
    path = llama3_tokenizer_model()
    if path is None:
        pytest.skip("Meta's Llama 3 tokenizer is not installed: pip install --no-deps llama-models==0.3.0")
    meta = load_tokenizer(tokenizer_file(path))
    # The GGUF was converted from Llama 3.0, which names five special tokens and reserves the rest; Meta's
    # file is Llama 3.1's, which names seven more (<|eom_id|> 128008 is a stop token there).
    named = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
    assert [llama3_gguf.token_id(t) for t in named] == [meta.token_id(t) for t in named]
    assert set(llama3_gguf.special_tokens.values()) == set(meta.special_tokens.values()) == set(range(128000, 128256))
    assert (llama3_gguf.vocab_size, llama3_gguf.bos_id, llama3_gguf.eos_id, llama3_gguf.add_bos) == \
        (meta.vocab_size, meta.bos_id, meta.eos_id, meta.add_bos) == (128256, 128000, 128001, True)
    assert llama3_gguf.stop_ids == {128001, 128009} and meta.stop_ids == {128001, 128008, 128009}
    text = "\n".join(ROUND_TRIP) + " ".join(llamacpp_vocab.golden_cases("llama-bpe")[-1][0] for _ in range(3))
    for sample in [*ROUND_TRIP, text, "    indented\n\t\tcode   \n\n\n", "x" * 3000 + " " * 3000 + "1234567"]:
        assert llama3_gguf.encode(sample, bos=True) == meta.encode(sample, bos=True), sample[:40]
        assert llama3_gguf.decode(llama3_gguf.encode(sample)) == sample
    assert llama3_gguf.encode_template("<|start_header_id|>user<|end_header_id|>\n\n") == [128006, 882, 128007, 271]
    assert llama3_gguf.encode("<|eot_id|>") == meta.encode("<|eot_id|>") != [128009]  # user text stays text


# ----- merges that repeat results, against Hugging Face's BPE -----

SPACE = byte_to_unicode()[ord(" ")]  # 'Ġ'
# (merge, the id of the token it yields), in merge-list order. As in Llama 3, a token can be the result of
# several merges, and ids do not follow the list: 'll' (256) is listed after 'el' (257), so tiktoken
# (rank = id) merges 'l l' first where the BPE merges 'e l' first: 'ello' is 'el'+'lo' by the list, 'e'+'llo'
# by id.
REPEATING_MERGES = [("e l", 257), ("l l", 256), ("l o", 258), ("ll o", 259), ("l lo", 259), ("h e", 260),
                    ("he l", 261), ("h el", 261), (f"{SPACE} {SPACE}", 262), (f"{SPACE}{SPACE} {SPACE}", 263),
                    (f"{SPACE} {SPACE}{SPACE}", 263), ("y el", 264), ("yel lo", 265), ("f ello", 266),
                    ("el lo", 267), ("e llo", 267)]
REPEATING_TEXTS = ["hello", "yellow fellow", "ello llo", "  hello   hello\n", "hel helo hell", "yello wellow",
                   "cello, jello!", "h e l l o"]


def repeating_vocab() -> tuple[dict[str, int], list[str]]:
    """256 byte tokens (id = byte) and the tokens of REPEATING_MERGES."""
    chars = byte_to_unicode()
    vocab = {chars[b]: b for b in range(256)}
    for merge, i in REPEATING_MERGES:
        vocab[merge.replace(" ", "", 1)] = i
    return vocab, [merge for merge, _ in REPEATING_MERGES]


def hf_bpe(vocab: dict[str, int], merges: list[str], *, byte_level: bool = True):
    """Hugging Face's BPE on the same vocabulary and merges, with GPT-2's byte-level pre-tokenizer."""
    tokenizers = import_or_skip_outside_ci("tokenizers", "Hugging Face tokenizers (requirements-dev.txt) "
                                                         "is the oracle for the merge-rank BPE")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges]))
    if byte_level:
        tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return lambda text: tok.encode(text, add_special_tokens=False).ids


def test_merges_that_repeat_results_tokenize_as_hugging_face(tmp_path):
    vocab, merges = repeating_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    path = write_gguf_metadata(tmp_path / "vocab.gguf", {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * len(tokens), "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.eos_token_id": 0})
    tok = load_tokenizer(ModelSource("repeats", gguf_path=path))
    oracle = hf_bpe(vocab, merges)
    byte_of = {c: b for b, c in byte_to_unicode().items()}
    ranks = {bytes(byte_of[c] for c in t): i for t, i in vocab.items()}  # the previous conversion: rank = id
    by_id = TiktokenTokenizer("by-id", ranks, {}, GPT2_PATTERN, bos_id=None, eos_id=0, add_bos=False)
    # The vocabulary tells the two rankings apart: tiktoken by id gets some of these texts wrong.
    assert any(by_id.encode(text) != oracle(text) for text in REPEATING_TEXTS)
    for text in REPEATING_TEXTS:
        assert tok.encode(text) == oracle(text), text
        assert tok.decode(tok.encode(text)) == text


# ----- when tiktoken is exact: random vocabularies against brute force -----

def random_vocab(rng: random.Random, n_merges: int, repeats: bool) -> tuple[dict[str, int], list[str]]:
    """Tokens over 'abc' grown by random merges of existing tokens; with ``repeats``, some merges yield a
    token already made and ids are shuffled among the merged tokens, as in Llama 3."""
    vocab, merges = {"a": 0, "b": 1, "c": 2}, []
    while len(merges) < n_merges:
        left, right = rng.choice(list(vocab)), rng.choice(list(vocab))
        if len(left + right) > 5 or f"{left} {right}" in merges:
            continue
        if left + right in vocab and not (repeats and rng.random() < 0.5):
            continue
        vocab.setdefault(left + right, len(vocab))
        merges.append(f"{left} {right}")
    if repeats:
        merged = [t for t in vocab if len(t) > 1]
        ids = [vocab[t] for t in merged]
        rng.shuffle(ids)
        vocab.update(zip(merged, ids))
    return vocab, merges


def words(max_len: int) -> list[str]:
    return ["".join(w) for n in range(1, max_len + 1) for w in itertools.product("abc", repeat=n)]


def tiktoken_by_id(vocab: dict[str, int]):
    ranks = {t.encode(): i for t, i in vocab.items()}
    ranks.update({bytes([b]): len(vocab) + b for b in range(256) if bytes([b]) not in ranks})
    return tiktoken.Encoding("random", pat_str=r"[abc]+", mergeable_ranks=ranks, special_tokens={})


def test_tiktoken_is_exact_exactly_when_brute_force_says_so():
    """tiktoken_is_exact's verdict against its definition, on random vocabularies: where the merges yield
    rising ids from lower ones, exact iff every token is the BPE's result on its own characters, and then
    tiktoken equals the BPE on every word up to 6 letters; else never exact. The BPE itself equals
    Hugging Face's on every vocabulary."""
    rng = random.Random(0)
    all_words = words(6)
    verdicts = {True: 0, False: 0}
    for k in range(120):
        vocab, merges = random_vocab(rng, n_merges=rng.randint(3, 12), repeats=k % 3 == 0)
        bpe_encode = WordEncoder(vocab, merges, ignore_merges=False)
        exact = tiktoken_is_exact(vocab, merges) is None
        verdicts[exact] += 1
        results = [vocab[m.replace(" ", "")] for m in merges]
        rising = all(a < b for a, b in zip(results, results[1:])) and \
            all(vocab[part] < t for m, t in zip(merges, results) for part in m.split(" "))
        if rising:
            assert exact == all(bpe_encode(t) == [i] for t, i in vocab.items()), (vocab, merges)
        else:
            assert not exact, (vocab, merges)
        if exact:
            fast = tiktoken_by_id(vocab)
            assert all(fast.encode_ordinary(w) == bpe_encode(w) for w in all_words), (vocab, merges)
        oracle = hf_bpe(vocab, merges, byte_level=False)
        assert all(bpe_encode(w) == oracle(w) for w in all_words[:363]), (vocab, merges)  # up to 5 letters
    assert verdicts[True] >= 20 and verdicts[False] >= 20, verdicts
