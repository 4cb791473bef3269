"""torch.ops.torchchat.decode_attention (torchchat/csrc/decode_attention.cpp): one query position of each sequence
over the filled part of its KV cache row, against float64, a batch's rows bit-identical to one-row calls, under
Dynamo, and in the decode step (greedy tokens, cache dtypes, rows at their own positions)."""

import pytest
import torch

from tests.generators import local_generator, tiny_source
from tests.kernel_build import needs_kernels
from torchchat import cpu as cpu_kernels
from torchchat.generate.base import GenerationArgs, Turn

pytestmark = needs_kernels

GREEDY = GenerationArgs(max_new_tokens=24, temperature=0, top_k=None, seed=0)


def attention_reference(q, k_cache, v_cache, positions, rows=None) -> torch.Tensor:
    """float64 softmax attention of each row b of q over positions [0, positions[b]] of cache row rows[b] (default:
    b), grouped heads expanded."""
    group = q.size(1) // k_cache.size(1)
    out = []
    for b, position in enumerate(positions):
        row = b if rows is None else rows[b]
        k = k_cache[row, :, :position + 1].double().repeat_interleave(group, dim=0)  # (n_heads, len, head_dim)
        v = v_cache[row, :, :position + 1].double().repeat_interleave(group, dim=0)
        scores = q[b].double() @ k.transpose(-1, -2) / q.size(-1) ** 0.5  # (n_heads, 1, len)
        out.append(scores.softmax(-1) @ v)  # (n_heads, 1, head_dim)
    return torch.stack(out)  # (B, n_heads, 1, head_dim)


def attend(q, k, v, positions, rows=None) -> torch.Tensor:
    """The op on a batch: row b at positions[b], in cache row rows[b] (default: b)."""
    rows = range(q.size(0)) if rows is None else rows
    return torch.ops.torchchat.decode_attention(q, k, v, torch.tensor(positions), torch.tensor(rows))


# (batch, heads, kv heads, cache length, head dim, position): the first and the last cache position, grouped
# heads, a head dim with a scalar tail, a length with one, SmolLM2's and Llama 3.2 1B's shapes, and a head dim of
# two 64-value slabs with a length of 77 (8-position score blocks and a tail of 5); lengths of one 64-position
# work unit, one and a position, two (attend.h merges the units' softmaxes). Batch row b sits at position - b in
# cache row batch - b (rows taken from the end, row 0 never), and reads nothing of the others.
@pytest.mark.parametrize("shape", [(1, 4, 4, 33, 16, 0), (1, 9, 3, 640, 64, 600), (2, 6, 2, 50, 24, 49),
                                   (1, 3, 1, 20, 5, 8), (1, 32, 8, 640, 64, 639), (1, 4, 2, 100, 128, 76),
                                   (1, 4, 2, 130, 64, 63), (2, 4, 2, 130, 64, 64), (1, 4, 2, 130, 64, 127)])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_decode_attention_matches_float64_reference(shape, cache_dtype):
    batch, heads, kv_heads, length, head_dim, position = shape
    torch.manual_seed(length + position)
    q = torch.randn(batch, heads, 1, head_dim) * 3  # larger scores: the softmax's exp is exercised
    k, v = torch.randn(2, batch + 1, kv_heads, length, head_dim).to(cache_dtype).unbind(0)
    positions, rows = [position - b for b in range(batch)], [batch - b for b in range(batch)]
    k[0] = float("nan")  # a row no sequence attends must not be read
    for position, row in zip(positions, rows):
        k[row, :, position + 1:] = float("nan")  # nor positions after a row's current one
    out = attend(q, k.contiguous(), v.contiguous(), positions, rows)
    assert out.shape == q.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), attention_reference(q, k, v, positions, rows), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_decode_attention_rows_equal_one_row_calls(batch, cache_dtype, two_threads):
    """A batch's sequences, each at its own position in its own cache row (scrambled), in one parallel region on 2
    threads: each row's output is bit-identical to the call with that row alone on 1 thread."""
    torch.manual_seed(batch)
    q = torch.randn(batch, 4, 1, 64) * 3
    k, v = torch.randn(2, 10, 2, 200, 64).to(cache_dtype).unbind(0)  # 10 cache rows of 200 positions
    rows, positions = torch.randperm(10)[:batch], torch.randperm(200)[:batch]  # 1 to 4 64-position units a head
    out = torch.ops.torchchat.decode_attention(q, k, v, positions, rows)
    torch.set_num_threads(1)  # and alone on one thread
    for b in range(batch):
        alone = torch.ops.torchchat.decode_attention(q[b:b + 1], k, v, positions[b:b + 1], rows[b:b + 1])
        assert torch.equal(out[b:b + 1], alone), f"row {b} of {batch}"


def test_decode_attention_takes_and_returns_the_query_dtype():
    q = torch.randn(1, 2, 1, 8).bfloat16()
    k, v = torch.randn(2, 1, 2, 10, 8).unbind(0)
    out = attend(q, k.contiguous(), v.contiguous(), [4])
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), attention_reference(q.float(), k, v, [4]), rtol=1e-2, atol=1e-2)


def test_decode_attention_bad_input_is_a_clear_error():
    q, k = torch.randn(1, 2, 1, 8), torch.randn(2, 2, 10, 8)
    with pytest.raises(RuntimeError, match="position 10 is outside the cache"):
        attend(q, k, k, [10])
    with pytest.raises(RuntimeError, match="cache row 2 is outside the cache \\(2 rows\\)"):
        attend(q, k, k, [1], [2])
    with pytest.raises(RuntimeError, match="1 sequences need 1 positions and 1 cache rows, got 2 and 1"):
        attend(q, k, k, [1, 2], [0])
    with pytest.raises(RuntimeError, match="caches must be contiguous, both float32 or both float16"):
        attend(q, k.bfloat16(), k.bfloat16(), [1])
    with pytest.raises(RuntimeError, match="both float32 or both float16"):
        attend(q, k.half(), k, [1])
    with pytest.raises(RuntimeError, match="heads a multiple of kv_heads"):
        attend(torch.randn(1, 3, 1, 8), k, k, [1])


def test_decode_attention_traces_without_a_graph_break():
    q, k, v = torch.randn(2, 4, 1, 16), torch.randn(3, 2, 12, 16), torch.randn(3, 2, 12, 16)
    step = torch.compile(lambda q, k, v, pos, rows: torch.ops.torchchat.decode_attention(q, k, v, pos, rows) + 1,
                         fullgraph=True, backend="aot_eager")
    for positions, rows in (([3, 5], [2, 0]), ([7, 1], [1, 2])):  # one graph: positions and rows are data
        torch.testing.assert_close(step(q, k, v, torch.tensor(positions), torch.tensor(rows)).double(),
                                   attention_reference(q, k, v, positions, rows) + 1, rtol=1e-5, atol=1e-6)


def test_decode_uses_the_attention_kernel_and_gives_the_same_greedy_tokens(tiny_model):
    """Every attention layer of a CPU LocalGenerator takes the op for decode steps; without it, SDPA."""
    gen = local_generator(tiny_source(tiny_model))
    gen.model.decode_layers = None  # the fused blocks (tests/test_decode_layers.py) would not call the attention op
    layers = [layer.attention for layer in gen.model.layers.values()]
    assert all(a.decode_attention is torch.ops.torchchat.decode_attention for a in layers)
    calls = []
    for a in layers:
        a.decode_attention = lambda *args: calls.append(1) or torch.ops.torchchat.decode_attention(*args)
    with_kernel = gen.complete(Turn(gen.encode_prompt("Once upon a time"), GREEDY))[0].tokens
    assert len(calls) == len(layers) * (GREEDY.max_new_tokens - 1)  # every decode step, every layer
    for a in layers:
        a.decode_attention = None
    without = gen.complete(Turn(gen.encode_prompt("Once upon a time"), GREEDY))[0].tokens
    assert with_kernel == without and len(with_kernel) == GREEDY.max_new_tokens


def test_attention_kernel_needs_float16_or_float32_caches(tiny_model, monkeypatch):
    """cpu.install routes one-position attention to the op; a step over a cache it cannot read (bf16) keeps
    torch's attention."""
    from torchchat.model import Transformer

    model = Transformer(tiny_model.args)
    assert cpu_kernels.install(model)["attention"] == tiny_model.args.n_layers
    model.setup_caches(1, 32)
    assert model.layers["0"].attention.kv_cache.k.dtype == torch.float16  # install's choice
    model.decode_layers = None  # the fused blocks would not call the attention op
    calls = []
    real = torch.ops.torchchat.decode_attention
    for layer in model.layers.values():
        layer.attention.decode_attention = lambda *a: calls.append(1) or real(*a)
    with torch.no_grad():
        model(torch.tensor([[1]]), torch.tensor([0]))
        assert len(calls) == tiny_model.args.n_layers
        model.setup_caches(1, 32, dtype=torch.bfloat16)
        model(torch.tensor([[1]]), torch.tensor([0]))
    assert len(calls) == tiny_model.args.n_layers


def test_attention_kernel_takes_rows_at_their_own_positions_in_their_own_cache_rows(tiny_model):
    """A decode step of sequences prefilled to different lengths in scrambled cache rows, through the modules (as a
    tensor-parallel rank runs them: no fused blocks): every layer's attention goes to the op with each row's
    position and cache row, and the logits are torch's attention's over each row's own cache row."""
    from torchchat.model import Transformer

    torch.manual_seed(0)
    model = Transformer(tiny_model.args).eval()
    cpu_kernels.install(model, fuse_layers=False)
    model.setup_caches(4, 32)
    rows, lengths = torch.tensor([3, 0, 2]), [9, 4, 13]
    calls = []
    real = torch.ops.torchchat.decode_attention
    with torch.no_grad():
        for row, length in zip(rows, lengths):
            model(torch.randint(0, 100, (1, length)), torch.arange(length), row.view(1))
        after_prompts = [t.clone() for layer in model.layers.values() for t in layer.attention.kv_cache.buffers()]
        step = (torch.randint(0, 100, (3, 1)), torch.tensor(lengths).view(3, 1), rows)
        for layer in model.layers.values():
            layer.attention.decode_attention = lambda *a: calls.append((a[3].tolist(), a[4].tolist())) or real(*a)
        with_op = model(*step)
        for t, value in zip((t for layer in model.layers.values() for t in layer.attention.kv_cache.buffers()),
                            after_prompts):
            t.copy_(value)
        for layer in model.layers.values():
            layer.attention.decode_attention = None
        with_torch = model(*step)
    assert calls == [(lengths, [3, 0, 2])] * tiny_model.args.n_layers  # (positions, cache rows) a layer
    # float32 math both ways, over float16 caches: measured 1.3e-7 of the largest logit apart
    torch.testing.assert_close(with_op, with_torch, rtol=0, atol=1e-5 * with_torch.abs().max().item())
