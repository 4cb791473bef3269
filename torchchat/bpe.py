"""Byte-level BPE with merge ranks, as a GGUF 'gpt2' vocabulary defines it and llama.cpp runs it.

A merge's rank is its position in ``tokenizer.ggml.merges``; a word's byte characters are merged, lowest
rank first (leftmost on a tie), until no adjacent pair is a listed merge (llama.cpp's llm_tokenizer_bpe,
Hugging Face's BPE). Several merges may yield the same token (Llama 3 lists 'Ġ ĠĠĠ' and 'ĠĠ ĠĠ', both
'ĠĠĠĠ'); here that is no different from any other merge.

``tiktoken_is_exact`` tells when tiktoken, which merges the adjacent pair whose joined bytes have the
lowest id, gives the same tokens, so that a vocabulary can take that much faster path.
"""

from __future__ import annotations

import heapq
from typing import Mapping, Sequence


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, with which byte-level BPE vocabularies are written."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + k) for k, b in enumerate(others)}}


def split_merge(merge: str) -> tuple[str, str]:
    """'a b' -> ('a', 'b'), split at the first space after the first character, as llama.cpp does."""
    cut = merge.find(" ", 1)
    return (merge[:cut], merge[cut + 1:]) if cut > 0 else (merge, "")


def merge_ranks(merges: Sequence[str]) -> dict[tuple[str, str], int]:
    """(left, right) -> rank, the position of the pair's first listing (llama.cpp keeps the first)."""
    ranks: dict[tuple[str, str], int] = {}
    for k, merge in enumerate(merges):
        ranks.setdefault(split_merge(merge), k)
    return ranks


def bpe(symbols: list[str], ranks: Mapping[tuple[str, str], int]) -> list[str]:
    """The pieces of one word: ``symbols`` (its characters) merged by rank, lowest first, leftmost on a
    tie. A heap of candidate pairs, as llama.cpp: O(n log n), so a 25,000-space run is no trouble."""
    n = len(symbols)
    if n < 2:
        return symbols
    parts = list(symbols)
    nxt = [*range(1, n), -1]  # a linked list over the surviving parts
    prv = [*range(-1, n - 1)]
    heap = [(r, i, parts[i], parts[i + 1]) for i in range(n - 1)
            if (r := ranks.get((parts[i], parts[i + 1]))) is not None]
    heapq.heapify(heap)
    while heap:
        _, i, left, right = heapq.heappop(heap)
        j = nxt[i]
        if j < 0 or parts[i] != left or parts[j] != right:
            continue  # stale: one side has merged since this pair was queued
        parts[i], parts[j] = left + right, ""
        nxt[i] = nxt[j]
        if nxt[j] >= 0:
            prv[nxt[j]] = i
        for a, b in ((prv[i], i), (i, nxt[i])):
            if a >= 0 and b >= 0 and (r := ranks.get((parts[a], parts[b]))) is not None:
                heapq.heappush(heap, (r, a, parts[a], parts[b]))
    return [p for p in parts if p]


def tiktoken_is_exact(index: Mapping[str, int], merges: Sequence[str]) -> str | None:
    """None if tiktoken with rank = id tokenizes every word as the merge-rank BPE does, else why not.

    ``index``: text -> id of the tokens BPE may produce (byte-level text). Three conditions, checked in
    O(total token length):

    1. The merges yield tokens of strictly increasing id, each from operands of lower id. Then each
       token has one merge, and ranking a pair by its result's id orders pairs as the list does.
    2. Every token of two or more characters has a merge.
    3. Every token t is what the BPE makes of t's own characters (no token is unreachable).

    Why that suffices: tiktoken also merges a pair (x, y) that is not t's merge but whose bytes make
    a token t (SmolLM2 has 58,541 such splits, 'Ġ'+'the' = 'Ġthe'). Run both on a word; while they
    agree, suppose x, y are adjacent. They were built only from merges inside t's span (nothing
    crossed its edges yet), in the same order as the BPE run on t alone, which so reaches [x, y] and
    stops there, since (x, y) is not listed: t is unreachable, against 3. So such a pair never
    appears, both see the same candidate pairs, order them the same (1) and break ties leftmost:
    they agree to the end. SmolLM2's, GPT-2's and StarCoder's vocabularies meet all three; Llama 3's
    fails 1 (152,403 merges repeat a result), and takes the merge-rank BPE.
    """
    merge_of: dict[int, tuple[int, int]] = {}  # token id -> the ids of its merge's operands
    last, get = -1, index.get
    for k, merge in enumerate(merges):
        left, _, right = merge.partition(" ")
        if not left:  # a merge whose left side starts with a space (never in byte-level text)
            left, right = split_merge(merge)
        t, a, b = get(left + right), get(left), get(right)
        if t is None or a is None or b is None:
            return f"merge {k} ('{merge}') joins or yields text that is not a token"
        if t <= last:
            return f"merge {k} ('{merge}') yields a token of lower id than a merge before it"
        if a >= t or b >= t:
            return f"merge {k} ('{merge}') yields a token of lower id than one it joins"
        merge_of[t] = (a, b)
        last = t
    for text, t in index.items():
        if len(text) > 1 and t not in merge_of:
            return f"token {t} ('{text}') has no merge"
    pair_rank = {ab: t for t, ab in merge_of.items()}
    for t, (u, v) in merge_of.items():
        if _crosses(u, v, merge_of, pair_rank):
            return f"token {t} is not what the merges make of its own characters"
    return None


def _crosses(u: int, v: int, merge_of: Mapping[int, tuple[int, int]], pair_rank: Mapping[tuple[int, int], int]) -> bool:
    """Whether, run on the characters of u then v, the BPE merges across their border before u and v are
    built. ``u`` and ``v`` are each assumed to be built from their own characters (condition 3 for
    tokens of lower id). Under condition 1 a token appears at the time of its id and lives until its
    parent is built; the right edge of u's side runs down u's right spine (u, u's right operand, ...),
    the left edge of v's side down v's left spine. A pair (a, b) of those edges crosses if it is a
    merge whose rank falls while both live (on a tie, see below). The sweep walks the two spines from
    the top, visiting each pair of edges that live at the same time once."""
    a, b = u, v
    a_end = b_end = None  # the id at which a, b are merged into their spine parent (None: never, here)
    while True:
        if (a, b) != (u, v):
            rank = pair_rank.get((a, b))
            # On a tie the leftmost pair merges first: b's own merge (b with what follows it) loses to (a, b),
            # a's own (what precedes a, with a) wins.
            if rank is not None and (a_end is None or rank < a_end) and (b_end is None or rank <= b_end):
                return True
        a_born = a if a in merge_of else -1  # a single character lives from the start
        b_born = b if b in merge_of else -1
        if a_born < 0 and b_born < 0:
            return False
        if a_born >= b_born:
            a_end, a = a, merge_of[a][1]
        else:
            b_end, b = b, merge_of[b][0]


class WordEncoder:
    """One pre-tokenized word -> ids by merge rank, as llama.cpp's llm_tokenizer_bpe_session does.

    ``index``: byte-level text -> id of the tokens BPE may produce; ``ignore_merges`` (llama.cpp's flag
    for Llama 3 vocabularies): a word that is itself a token is that token, merges or not (Llama 3 has
    588 tokens the merges never build from their characters). A character no token covers blocks the
    merges around it and is dropped, as llama.cpp drops it.
    """

    def __init__(self, index: Mapping[str, int], merges: Sequence[str], *, ignore_merges: bool):
        self._index = index
        self._ranks = merge_ranks(merges)
        self._ignore_merges = ignore_merges
        self._byte_chars = {b: c for b, c in byte_to_unicode().items()}  # for str.translate over latin-1

    def __call__(self, word: str) -> list[int]:
        text = word.encode().decode("latin-1").translate(self._byte_chars)  # one character per byte
        index = self._index
        if self._ignore_merges and (whole := index.get(text)) is not None:
            return [whole]
        return [index[p] for p in bpe(list(text), self._ranks) if p in index]
