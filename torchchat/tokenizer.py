"""Tokenizers: tiktoken (Llama 3's tokenizer.model), byte-level BPE by merge rank (a GGUF's 'gpt2'
vocabulary: by tiktoken where that is exact, else in Python) and sentencepiece (Llama 2) behind one interface.

``load_tokenizer(source)`` finds the tokenizer of a ModelSource: an explicit ``--tokenizer-path`` file,
the vocabulary stored in a GGUF's metadata, or ``tokenizer.model`` in a checkpoint directory. Formats are
told apart by content, never by file name.

Two ways in: ``encode`` is for text a user wrote and never yields a control token, even when the text
spells one (``"<|im_end|>"`` typed in a chat is six ordinary tokens); ``encode_template`` is for a chat
template's own markup, where those strings become their ids.
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
from abc import ABC, abstractmethod
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, Sequence

import regex
import sentencepiece
import tiktoken

from torchchat.bpe import WordEncoder, byte_to_unicode, tiktoken_is_exact
from torchchat.catalog import ModelSource
from torchchat.errors import TokenizerError

# Tokens that end a reply: end of text, of turn, of message. Whichever a vocabulary has are stop ids.
END_TOKENS = ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|endoftext|>", "<|end|>",
              "<end_of_turn>", "</s>")

# Meta's Llama 3 special tokens, appended after the base vocabulary in this order (llama_models'
# llama3/tokenizer.py): <|begin_of_text|> = 128000, <|eot_id|> = 128009 for the real file.
LLAMA3_SPECIALS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>",
)
LLAMA3_NUM_SPECIALS = 256

# Pre-tokenizer regexes (the split into words before BPE), by GGUF tokenizer.ggml.pre.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# llama.cpp's "smollm" (also "starcoder"): first isolate every digit (\p{N}), then GPT-2's regex on each
# piece in between. tiktoken takes one regex, so the two passes are folded into one: a digit is a
# word of its own, and since a digit ended the piece before it, whitespace followed by a digit counts
# as trailing whitespace: GPT-2's \s+(?!\S) becomes \s+(?![^\s\p{N}]).
SMOLLM_PATTERN = r"\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"
GGUF_PRE_PATTERNS = {"smollm": SMOLLM_PATTERN, "starcoder": SMOLLM_PATTERN, "llama-bpe": LLAMA3_PATTERN,
                     "llama3": LLAMA3_PATTERN, "gpt-2": GPT2_PATTERN}
# The pre-tokenizers llama.cpp runs with ignore_merges (a word that is a token is that token) and adds BOS
# for unless the file says otherwise (llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_LLAMA3).
LLAMA3_PRES = frozenset({"llama-bpe", "llama3"})

# Words the merge-rank BPE remembers: more than the distinct words of a 1 MB English text (about 40,000).
_WORD_CACHE_SIZE = 1 << 17

# tiktoken's regex engine can overflow on very long runs without (or of) whitespace (tiktoken issue
# 195); Meta's reference cuts the text before encoding too (see _chunks).
_MAX_ENCODE_CHARS = 400_000
_MAX_RUN_CHARS = 25_000
_REPLACEMENT = "\ufffd".encode()

# GGUF token types (llama.cpp's, the same numbers as sentencepiece's piece types) that are not text.
_CONTROL, _USER_DEFINED = 3, 4


class Tokenizer(ABC):
    """Text <-> token ids, with the special tokens a chat format and the generator need.

    Subclasses implement ``encode`` (ordinary text only) and ``decode``; the base class handles the
    special tokens (``encode_template``, ``token_id``, ``stop_ids``).
    """

    vocab_size: int  # all ids, special tokens included
    bos_id: int | None
    eos_id: int
    add_bos: bool  # whether a prompt starts with BOS
    stop_ids: frozenset[int]  # the ids that end a reply

    def __init__(self, *, vocab_size: int, specials: Mapping[str, int], bos_id: int | None, eos_id: int,
                 add_bos: bool, extra_stop_ids: Sequence[int] = ()):
        self.vocab_size = vocab_size
        self._specials = dict(specials)
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.add_bos = add_bos and bos_id is not None
        ends = [self._specials[name] for name in END_TOKENS if name in self._specials]
        self.stop_ids = frozenset([eos_id, *ends, *extra_stop_ids])
        # Longest first, so that a special token that is a prefix of another never wins.
        names = sorted(self._specials, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, names))) if names else None

    @abstractmethod
    def encode(self, text: str, bos: bool = False) -> list[int]:
        """Ids of user text; special token strings in it are encoded as ordinary text."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids; an incomplete UTF-8 character decodes as U+FFFD."""

    def encode_template(self, text: str) -> list[int]:
        """Ids of a chat template's text: each special token string becomes its id."""
        ids = []
        for part in self.split_specials(text):
            ids += [part] if isinstance(part, int) else self.encode(part)
        return ids

    def split_specials(self, text: str) -> list[str | int]:
        """``text`` as runs of ordinary text and the ids of the special token strings between them."""
        if self._special_re is None:
            return [text] if text else []
        parts, pos = [], 0
        for m in self._special_re.finditer(text):
            if m.start() > pos:
                parts.append(text[pos:m.start()])
            parts.append(self._specials[m.group()])
            pos = m.end()
        if pos < len(text):
            parts.append(text[pos:])
        return parts

    def token_id(self, piece: str) -> int | None:
        """The id of a special (control) token by its text, None if the vocabulary lacks it."""
        return self._specials.get(piece)

    @property
    def special_tokens(self) -> Mapping[str, int]:
        """Text -> id of every special (control) token."""
        return MappingProxyType(self._specials)

    def _with_bos(self, ids: list[int], bos: bool) -> list[int]:
        return [self.bos_id, *ids] if bos and self.bos_id is not None else ids


class TiktokenTokenizer(Tokenizer):
    """A byte-level BPE run by tiktoken: Llama 3's tokenizer.model, or a GGUF's GPT-2 style vocabulary."""

    def __init__(self, name: str, ranks: dict[bytes, int], specials: Mapping[str, int], pattern: str, *,
                 bos_id: int | None, eos_id: int, add_bos: bool, vocab_size: int | None = None,
                 extra_stop_ids: Sequence[int] = (), unencodable: Mapping[int, bytes] = MappingProxyType({})):
        """``unencodable``: id -> bytes of tokens that decode but that BPE never produces (a GGUF's
        tokens whose text is not byte-level, duplicates)."""
        n = vocab_size or 1 + max(max(ranks.values()), max(specials.values(), default=-1),
                                  max(unencodable, default=-1))
        super().__init__(vocab_size=n, specials=specials, bos_id=bos_id, eos_id=eos_id, add_bos=add_bos,
                         extra_stop_ids=extra_stop_ids)
        self._table = [_REPLACEMENT] * n  # id -> bytes, for decode
        for piece, rank in ranks.items():
            if rank < n:
                self._table[rank] = piece
        for text, i in specials.items():
            self._table[i] = text.encode()
        for i, piece in unencodable.items():
            self._table[i] = piece
        # A byte that no token covers (a GGUF vocabulary may lack a few control characters) still needs
        # a rank, or tiktoken panics; such bytes get ranks past the vocabulary and are dropped after
        # encoding, as Hugging Face's BPE drops a character it cannot encode.
        ranks = dict(ranks)
        for b in range(256):
            ranks.setdefault(bytes([b]), n + b)
        self._drop_from = n if max(ranks.values()) >= n else None
        self._enc = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens={})

    def encode(self, text: str, bos: bool = False) -> list[int]:
        ids = []
        for chunk in _chunks(text):
            ids += self._enc.encode_ordinary(chunk)
        if self._drop_from is not None:
            ids = [i for i in ids if i < self._drop_from]
        return self._with_bos(ids, bos)

    def decode(self, ids: Sequence[int]) -> str:
        return _decode_bytes(self._table, ids)


class MergeRankTokenizer(Tokenizer):
    """A GGUF's byte-level BPE run by merge rank in Python (torchchat/bpe.py), exactly as llama.cpp runs it:
    for vocabularies where tiktoken is not provably the same (Llama 3's, whose merges repeat results).

    The text is split into words by the pre-tokenizer's regex, each word merged once and remembered.
    """

    def __init__(self, words: WordEncoder, pattern: str, table: list[bytes], specials: Mapping[str, int], *,
                 bos_id: int | None, eos_id: int, add_bos: bool, extra_stop_ids: Sequence[int] = ()):
        """``table``: id -> bytes of every token, for decode."""
        super().__init__(vocab_size=len(table), specials=specials, bos_id=bos_id, eos_id=eos_id,
                         add_bos=add_bos, extra_stop_ids=extra_stop_ids)
        self._words = words
        self._split = regex.compile(pattern).findall
        self._table = table
        self._cache: dict[str, list[int]] = {}

    def encode(self, text: str, bos: bool = False) -> list[int]:
        ids, cache = [], self._cache
        for word in self._split(text):
            word_ids = cache.get(word)
            if word_ids is None:
                word_ids = self._words(word)
                if len(cache) >= _WORD_CACHE_SIZE:
                    cache.clear()
                cache[word] = word_ids
            ids += word_ids
        return self._with_bos(ids, bos)

    def decode(self, ids: Sequence[int]) -> str:
        return _decode_bytes(self._table, ids)


def _decode_bytes(table: list[bytes], ids: Sequence[int]) -> str:
    n = len(table)
    return b"".join(table[i] if 0 <= i < n else _REPLACEMENT for i in ids).decode("utf-8", errors="replace")


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model (Llama 2's tokenizer.model, or a GGUF's 'llama' vocabulary)."""

    def __init__(self, processor: sentencepiece.SentencePieceProcessor, *, bos_id: int | None = None,
                 eos_id: int | None = None, add_bos: bool = True, extra_stop_ids: Sequence[int] = ()):
        self._sp = processor
        n = processor.vocab_size()
        specials = {processor.id_to_piece(i): i for i in range(n)
                    if processor.is_control(i) or processor.is_unknown(i)}
        bos = bos_id if bos_id is not None else processor.bos_id()
        eos = eos_id if eos_id is not None else processor.eos_id()
        super().__init__(vocab_size=n, specials=specials, bos_id=bos if bos >= 0 else None, eos_id=eos,
                         add_bos=add_bos, extra_stop_ids=extra_stop_ids)

    def encode(self, text: str, bos: bool = False) -> list[int]:
        # sentencepiece never yields a control piece (<s>, </s>) from text.
        return self._with_bos(self._sp.encode(text) if text else [], bos)

    def decode(self, ids: Sequence[int]) -> str:
        n, unk = self.vocab_size, self._sp.unk_id()
        return self._sp.decode([i if 0 <= i < n else unk for i in ids])


def load_tokenizer(source: ModelSource) -> Tokenizer:
    """The tokenizer of a model: ``--tokenizer-path`` if given, else the GGUF's vocabulary, else the
    checkpoint directory's tokenizer.model. Raises TokenizerError naming the file and the fix."""
    if source.tokenizer_path is not None:
        return load_tokenizer_file(Path(source.tokenizer_path), "check --tokenizer-path")
    if source.gguf_path is not None:
        return _load_gguf(Path(source.gguf_path))
    if source.checkpoint_dir is not None:
        return load_tokenizer_file(_tokenizer_in_dir(Path(source.checkpoint_dir)), "give --tokenizer-path")
    raise TokenizerError(f"{source.weights_path} holds no tokenizer: give --tokenizer-path")


def load_tokenizer_file(path: Path, fix: str = "check --tokenizer-path") -> Tokenizer:
    """A tokenizer file of any supported format, told apart by its first bytes."""
    if path.is_dir():
        raise TokenizerError(f"the tokenizer path {path} is a directory, not a file ({fix})")
    if not path.is_file():
        raise TokenizerError(f"tokenizer file not found: {path} ({fix})")
    with open(path, "rb") as f:
        head = f.read(256)
    if head.startswith(b"GGUF"):
        return _load_gguf(path)
    if re.match(rb"[A-Za-z0-9+/]+=*[ \t]+\d+(\r?\n|$)", head):
        return _load_tiktoken(path, fix)
    return _load_sentencepiece(path, fix)


def _tokenizer_in_dir(directory: Path) -> Path:
    for candidate in (directory / "tokenizer.model", directory / "original" / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    extra = " (torchchat does not read tokenizer.json)" if (directory / "tokenizer.json").exists() else ""
    raise TokenizerError(f"no tokenizer.model in {directory}{extra}: give --tokenizer-path")


# ----- tiktoken files (Llama 3) -----

def _load_tiktoken(path: Path, fix: str) -> TiktokenTokenizer:
    ranks = {}
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise TokenizerError(f"{path} line {n} is not 'base64 rank': the file is damaged ({fix})") from None
    if len(set(ranks.values())) != len(ranks) or max(ranks.values()) != len(ranks) - 1:
        raise TokenizerError(f"{path}: the ranks are not 0..{len(ranks) - 1}, each once; the file is damaged ({fix})")
    names = LLAMA3_SPECIALS + tuple(f"<|reserved_special_token_{i}|>"
                                    for i in range(2, 2 + LLAMA3_NUM_SPECIALS - len(LLAMA3_SPECIALS)))
    specials = {name: len(ranks) + i for i, name in enumerate(names)}
    return TiktokenTokenizer(path.name, ranks, specials, LLAMA3_PATTERN, bos_id=specials["<|begin_of_text|>"],
                             eos_id=specials["<|end_of_text|>"], add_bos=True)


def _chunks(text: str):
    """``text`` cut where tiktoken could overflow; short texts (all real prompts) are not cut.

    A text longer than _MAX_ENCODE_CHARS is cut before a space between two letters, where every
    pre-tokenizer regex here ends a word (a letter run stops at the space, and ' ?\\p{L}+' or
    '[^\\r\\n\\p{L}\\p{N}]?\\p{L}+' starts the next at it; no pattern looks behind), so the cut changes no
    token. Meta's reference cuts at fixed offsets, which splits a word (a 1 MB text came out 3 tokens
    longer). Only a run longer than _MAX_RUN_CHARS is still cut where it must be."""
    start = 0
    while len(text) - start > _MAX_ENCODE_CHARS:
        cut = _word_border(text, start, start + _MAX_ENCODE_CHARS)
        yield from _cut_runs(text[start:cut])
        start = cut
    yield from _cut_runs(text[start:])


def _word_border(text: str, start: int, end: int) -> int:
    """The last position in (start, end) of a space between two letters, else ``end``."""
    pos = text.rfind(" ", start + 1, end)
    while pos > start:
        if text[pos - 1].isalpha() and text[pos + 1].isalpha():  # str.isalpha is \p{L}
            return pos
        pos = text.rfind(" ", start + 1, pos)
    return end


def _cut_runs(chunk: str):
    if len(chunk) <= _MAX_RUN_CHARS:
        yield chunk
        return
    cut = 0  # a cut inside each run of whitespace or of non-whitespace longer than the limit
    for run in re.finditer(r"\s+|\S+", chunk):
        for pos in range(run.start() + _MAX_RUN_CHARS, run.end(), _MAX_RUN_CHARS):
            yield chunk[cut:pos]
            cut = pos
    yield chunk[cut:]


# ----- sentencepiece files (Llama 2) -----

def _load_sentencepiece(path: Path, fix: str) -> SentencePieceTokenizer:
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.Load(str(path))
    except (OSError, RuntimeError) as e:
        raise TokenizerError(f"{path} is neither a tiktoken file nor a sentencepiece model "
                             f"({type(e).__name__}): {fix}") from None
    if processor.eos_id() < 0:
        raise TokenizerError(f"{path}: the sentencepiece model has no end-of-sequence piece </s> ({fix})")
    return SentencePieceTokenizer(processor)


# ----- the vocabulary in a GGUF's metadata -----

def _load_gguf(path: Path) -> Tokenizer:
    from torchchat.checkpoints.gguf import open_gguf  # the parsed file is shared with the weight loader

    fields = open_gguf(path).fields

    def meta(key, default=None):
        return fields.get(key, default)

    kind = meta("tokenizer.ggml.model")
    if kind is None:
        raise TokenizerError(f"{path} has no tokenizer in its metadata: give --tokenizer-path")
    if kind == "gpt2":
        return _gguf_bpe(path, meta)
    if kind == "llama":
        return _gguf_sentencepiece(path, meta)
    raise TokenizerError(f"{path} has a '{kind}' tokenizer; torchchat reads GGUF 'gpt2' (byte-level BPE) and "
                         f"'llama' (sentencepiece) vocabularies: give --tokenizer-path")


def _gguf_ids(path: Path, meta, n: int) -> dict:
    eos = meta("tokenizer.ggml.eos_token_id")
    if eos is None or not 0 <= eos < n:
        raise TokenizerError(f"{path} names no valid end-of-sequence token (tokenizer.ggml.eos_token_id): "
                             f"re-convert the model with llama.cpp's convert_hf_to_gguf.py")
    bos = meta("tokenizer.ggml.bos_token_id")
    extra = [meta(f"tokenizer.ggml.{k}_token_id") for k in ("eot", "eom")]
    return {"bos_id": bos if bos is not None and 0 <= bos < n else None, "eos_id": eos,
            "extra_stop_ids": [i for i in extra if i is not None and 0 <= i < n]}


def _gguf_bpe(path: Path, meta) -> Tokenizer:
    """A GPT-2 style byte-level BPE, run exactly as llama.cpp runs it: by tiktoken (a token's rank is its
    id) where torchchat.bpe.tiktoken_is_exact proves that the same (SmolLM2, GPT-2, StarCoder), else by
    merge rank in Python (Llama 3, whose merges repeat results: 'Ġ ĠĠĠ' and 'ĠĠ ĠĠ' both give 'ĠĠĠĠ')."""
    tokens, types = meta("tokenizer.ggml.tokens"), meta("tokenizer.ggml.token_type")
    merges = meta("tokenizer.ggml.merges", [])
    pre = meta("tokenizer.ggml.pre", "gpt-2")
    if tokens is None or types is None or len(tokens) != len(types):
        raise TokenizerError(f"{path}: the token list or types are missing: re-convert the model")
    if pre not in GGUF_PRE_PATTERNS:
        raise TokenizerError(f"{path} uses the pre-tokenizer '{pre}', which torchchat does not know "
                             f"(known: {', '.join(GGUF_PRE_PATTERNS)}): give --tokenizer-path")
    byte_of = {c: b for b, c in byte_to_unicode().items()}
    index, specials, table = {}, {}, []  # index: byte-level text -> id of the tokens BPE may produce
    for i, (text, kind) in enumerate(zip(tokens, types)):
        if kind in (_CONTROL, _USER_DEFINED):
            specials[text] = i
            table.append(text.encode())
            continue
        try:
            table.append(bytes(byte_of[c] for c in text))
        except KeyError:  # not byte-level text: decodable, never produced
            table.append(text.encode())
            continue
        index.setdefault(text, i)  # a duplicate decodes, the first is produced
    pattern = GGUF_PRE_PATTERNS[pre]
    ids = _gguf_ids(path, meta, len(tokens))
    add_bos = bool(meta("tokenizer.ggml.add_bos_token", pre in LLAMA3_PRES))
    if tiktoken_is_exact(index, merges) is None:
        ranks = {table[i]: i for i in index.values()}
        unencodable = {i: piece for i, piece in enumerate(table) if ranks.get(piece) != i}
        return TiktokenTokenizer(path.name, ranks, specials, pattern, vocab_size=len(tokens), add_bos=add_bos,
                                 unencodable=unencodable, **ids)
    words = WordEncoder(index, merges, ignore_merges=pre in LLAMA3_PRES)
    return MergeRankTokenizer(words, pattern, table, specials, add_bos=add_bos, **ids)


def _gguf_sentencepiece(path: Path, meta) -> SentencePieceTokenizer:
    """A GGUF 'llama' vocabulary (pieces, scores, types) rebuilt as a sentencepiece BPE model: byte
    fallback, digits split, identity normalizer, as Llama 2's tokenizer.model."""
    tokens, types = meta("tokenizer.ggml.tokens"), meta("tokenizer.ggml.token_type")
    scores = meta("tokenizer.ggml.scores") or [0.0] * len(tokens or ())
    if tokens is None or types is None or not len(tokens) == len(types) == len(scores):
        raise TokenizerError(f"{path}: the token list, scores or types are missing: re-convert the model")
    # Hand-written protobuf (sentencepiece_model.proto): the python package's generated module needs
    # google.protobuf, which torchchat does not otherwise depend on.
    pieces = b"".join(_pb_bytes(1, _pb_bytes(1, text.encode()) + _pb_float(2, score) + _pb_varint(3, kind))
                      for text, score, kind in zip(tokens, scores, types))
    trainer = _pb_varint(3, 2) + _pb_varint(4, len(tokens)) + _pb_varint(25, 1) + _pb_varint(35, 1)  # BPE
    add_prefix = bool(meta("tokenizer.ggml.add_space_prefix", True))
    normalizer = (_pb_bytes(1, b"identity") + _pb_varint(3, add_prefix) + _pb_varint(4, 0)
                  + _pb_varint(5, 1))
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(pieces + _pb_bytes(2, trainer) + _pb_bytes(3, normalizer))
    except (OSError, RuntimeError) as e:
        raise TokenizerError(f"{path}: its sentencepiece vocabulary is invalid ({e}): give --tokenizer-path") from None
    return SentencePieceTokenizer(processor, add_bos=bool(meta("tokenizer.ggml.add_bos_token", True)),
                                  **_gguf_ids(path, meta, len(tokens)))


def _pb_varint_raw(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _pb_varint(field: int, value: int) -> bytes:
    return _pb_varint_raw(field << 3) + _pb_varint_raw(int(value))


def _pb_float(field: int, value: float) -> bytes:
    return _pb_varint_raw(field << 3 | 5) + struct.pack("<f", value)


def _pb_bytes(field: int, data: bytes) -> bytes:
    return _pb_varint_raw(field << 3 | 2) + _pb_varint_raw(len(data)) + data
