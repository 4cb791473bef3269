"""torch.ops.torchchat.decode_layers (torchchat/csrc/decode_layers.cpp): a model's transformer blocks for one
position of each sequence of a batch in one call, against the blocks' own modules (outputs and cache writes), for
every weight format it takes; a batch's rows bit-identical to one-row calls; cpu_kernels.use_fused_decode's choice
of models and steps; LocalGenerator's greedy tokens with and without it, eager and compiled."""

import re
from pathlib import Path

import pytest
import torch

from tests.block_models import BATCH_ARGS, CACHE_ROWS, random_caches, random_model, scrambled_step
from tests.generators import local_generator, tiny_source
from tests.kernel_build import needs_kernels
from torchchat import cpu as cpu_kernels
from torchchat.generate.base import GenerationArgs, Turn
from torchchat.model import ModelArgs, Transformer

pytestmark = needs_kernels

GREEDY = GenerationArgs(max_new_tokens=16, temperature=0, top_k=None, seed=0)


def caches(model: Transformer) -> list[torch.Tensor]:
    return [t.clone() for layer in model.layers.values()
            for t in (layer.attention.kv_cache.k, layer.attention.kv_cache.v)]


def set_caches(model: Transformer, values: list[torch.Tensor]):
    for t, value in zip((t for layer in model.layers.values() for t in (layer.attention.kv_cache.k,
                                                                          layer.attention.kv_cache.v)), values):
        t.copy_(value)


SMOLLM2_LIKE = ModelArgs(dim=576, n_layers=2, n_heads=9, n_kv_heads=3, vocab_size=300, hidden_dim=1536)  # head_dim 64
HEAD_DIM_128 = ModelArgs(dim=512, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, hidden_dim=1024)
HEAD_DIM_48 = ModelArgs(dim=288, n_layers=2, n_heads=6, vocab_size=300, hidden_dim=768)  # stories15m's heads


# Shapes: SmolLM2's heads (64: the register-resident sums), 128 (two slabs of 64), 48 (the position-at-a-time
# rest); positions: a first one, tails of the 8-position score loop, a long prefix.
@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.float32], ids=["fp16-cache", "fp32-cache"])
@pytest.mark.parametrize("weights", ["fp32", "int8", "int8-blocks", "int4", "int4-g64", "bf16"])
@pytest.mark.parametrize("args", [SMOLLM2_LIKE, HEAD_DIM_128, HEAD_DIM_48], ids=["hd64", "hd128", "hd48"])
def test_fused_block_equals_the_modules(weights, args, cache_dtype):
    """Logits after a prompt and four decode steps, and every cache entry written, match the unfused step."""
    model = random_model(args, weights, cache_dtype=cache_dtype)
    prompt = torch.randint(0, args.vocab_size, (1, 37))
    tokens = torch.randint(0, args.vocab_size, (4,))
    with torch.no_grad():
        model(prompt, torch.arange(37))
        after_prompt = caches(model)
        want = [model(tokens[i].view(1, 1), torch.tensor([37 + i])) for i in range(4)]
        want_caches = caches(model)
        set_caches(model, after_prompt)
        assert cpu_kernels.use_fused_decode(model) == args.n_layers
        got = [model(tokens[i].view(1, 1), torch.tensor([37 + i])) for i in range(4)]
    # bf16: the op rounds to bf16 wherever the modules do (decode_layers.cpp's round_bf16): bit-identical
    # logits and caches (measured, every shape and cache dtype here). int4 (int8, either form): an input is rounded to
    # int8 (int16) for the integer dot products, and a last-bit difference upstream can move one value to the next
    # step (1/127 of its block's largest; 1/32767 of the vector's), in either path. Measured largest differences:
    # fp32 1.0e-6, int8 8.6e-5, int8 in blocks 8.3e-5, int4 1.8e-5 of the largest logit.
    relative = {"bf16": 0, "int4": 1e-2, "int4-g64": 1e-2, "int8": 3e-4, "int8-blocks": 3e-4}.get(weights, 1e-5)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g.float(), w.float(), rtol=0, atol=relative * w.float().abs().max().item())
    # A float16 cache: a key the two paths computed a last bit apart may round to neighbouring float16 values.
    cache_rtol = 2**-10 if cache_dtype == torch.float16 and weights != "bf16" else 0
    for g, w in zip(caches(model), want_caches):
        assert g.dtype == cache_dtype
        torch.testing.assert_close(g, w, rtol=cache_rtol, atol=relative * w.abs().max().item())


def test_fused_block_at_the_first_position_and_the_last():
    model = random_model(SMOLLM2_LIKE, "int4")
    with torch.no_grad():
        want = [model(torch.tensor([[5]]), torch.tensor([p])) for p in (0, 63)]
        cpu_kernels.use_fused_decode(model)
        got = [model(torch.tensor([[5]]), torch.tensor([p])) for p in (0, 63)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.float32], ids=["fp16-cache", "fp32-cache"])
@pytest.mark.parametrize("weights", ["fp32", "bf16", "int8", "int8-blocks", "int4", "int4-g64"])
def test_batch_rows_equal_one_row_calls(weights, cache_dtype, batch):
    """The op on a batch of sequences, each at its own position in its own cache row (scrambled), on 2 threads: each
    row's output and cache writes are bit-identical to the op on that row alone on 1 thread, and nothing else of
    the caches changes."""
    model = random_model(BATCH_ARGS, weights, cache_dtype=cache_dtype, max_batch=CACHE_ROWS)
    with torch.no_grad():
        random_caches(model)
        before = caches(model)
        h, rope, positions, rows = scrambled_step(model, batch, seed=batch)
        torch.set_num_threads(2)  # a weight's rows and the attention's units split over threads as in a run
        try:
            together = cpu_kernels.decode_layers(model, h, rope, positions, rows)  # (B, 1, dim)
        finally:
            torch.set_num_threads(1)
        after_together = caches(model)
        set_caches(model, before)
        alone = [cpu_kernels.decode_layers(model, h[b:b + 1], rope[b:b + 1], positions[b:b + 1], rows[b:b + 1])
                 for b in range(batch)]
    for b in range(batch):
        assert torch.equal(together[b:b + 1], alone[b]), f"row {b} of {batch}"
    written = torch.zeros(CACHE_ROWS, 64, dtype=torch.bool)  # (cache row, position)
    written[rows, positions] = True
    for t, (was, got, want) in enumerate(zip(before, after_together, caches(model))):
        assert torch.equal(got, want), f"cache {t}"
        changed = (got != was).any(-1).any(1)  # (cache row, position)
        assert torch.equal(changed, written), f"cache {t}: written where no row's position is"


def counted_fused_decode(model: Transformer) -> list:
    """Fuses the model's blocks; returns the list the op's calls append their batch sizes to."""
    assert cpu_kernels.use_fused_decode(model) == model.args.n_layers
    calls, fused = [], model.decode_layers
    model.decode_layers = lambda m, h, *a: calls.append(h.size(0)) or fused(m, h, *a)
    return calls


@pytest.mark.parametrize("weights", ["fp32", "int4"])
def test_model_batch_step_equals_one_row_steps(weights):
    """Transformer.forward of a decode step through the fused op (and the output layer through gemv): each
    sequence's logits, at its own position (input_pos (B, 1)) in its own cache row, equal its step alone, bit for
    bit; and so do B rows at one shared position (input_pos (1,), rows None: --num-samples)."""
    model = random_model(BATCH_ARGS, weights, max_batch=CACHE_ROWS)
    calls = counted_fused_decode(model)
    tokens = torch.randint(0, 300, (3, 1))
    with torch.no_grad():
        random_caches(model)
        before = caches(model)
        _, _, positions, rows = scrambled_step(model, 3, seed=0)
        together = model(tokens, positions.view(3, 1), rows)  # (B, 1, vocab)
        set_caches(model, before)
        alone = [model(tokens[b:b + 1], positions[b:b + 1].view(1, 1), rows[b:b + 1]) for b in range(3)]
        set_caches(model, before)
        shared = model(tokens, torch.tensor([7]))  # rows 0, 1, 2 at position 7
        set_caches(model, before)
        shared_alone = [model(tokens[b:b + 1], torch.tensor([7]), torch.tensor([b])) for b in range(3)]
    assert calls == [3, 1, 1, 1, 3, 1, 1, 1]
    for b in range(3):
        assert torch.equal(together[b:b + 1], alone[b]) and torch.equal(shared[b:b + 1], shared_alone[b])


@pytest.mark.parametrize("weights", ["fp32", "bf16", "int4"])
def test_fused_batch_step_equals_the_modules(weights):
    """Rows prefilled to different lengths in scrambled cache rows, then decode steps of all of them at once: the
    fused op's logits and cache writes match the modules' (torch's attention over each row's cache row, the
    model's masks), within test_fused_block_equals_the_modules's bounds."""
    model = random_model(BATCH_ARGS, weights, cache_dtype=torch.float32, max_batch=CACHE_ROWS)
    rows, lengths = torch.tensor([7, 2, 4]), [5, 19, 11]
    tokens = torch.randint(0, 300, (3, 3))
    with torch.no_grad():
        for row, length in zip(rows, lengths):
            model(torch.randint(0, 300, (1, length)), torch.arange(length), row.view(1))
        after_prompts = caches(model)
        for layer in model.layers.values():
            layer.attention.decode_attention = None  # torch's attention
        positions = torch.tensor(lengths).view(3, 1)
        want = [model(tokens[:, i:i + 1], positions + i, rows) for i in range(3)]
        want_caches = caches(model)
        set_caches(model, after_prompts)
        calls = counted_fused_decode(model)
        got = [model(tokens[:, i:i + 1], positions + i, rows) for i in range(3)]
    assert calls == [3, 3, 3]
    relative = {"bf16": 0, "int4": 1e-2}.get(weights, 1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w.float(), rtol=0, atol=relative * w.float().abs().max().item())
    for g, w in zip(caches(model), want_caches):
        torch.testing.assert_close(g, w, rtol=0, atol=relative * w.abs().max().item())


def test_fused_blocks_write_only_their_position():
    model = random_model(SMOLLM2_LIKE, "fp32")
    cpu_kernels.use_fused_decode(model)
    before = caches(model)
    with torch.no_grad():
        model(torch.tensor([[5]]), torch.tensor([9]))
    for b, a in zip(before, caches(model)):
        changed = (a != b).any(-1)  # (B, n_kv_heads, S)
        assert changed[0, :, 9].all() and changed.sum() == changed.size(1)


def test_prompts_and_batches_past_the_limit_keep_the_modules():
    """The op takes one position of each of up to MAX_GEMV_ROWS sequences; a prompt and a larger batch go through
    the modules."""
    limit = cpu_kernels.kernels.MAX_GEMV_ROWS
    model = random_model(SMOLLM2_LIKE, "fp32", max_batch=limit + 1)
    calls = counted_fused_decode(model)
    with torch.no_grad():
        model(torch.randint(0, 300, (1, 5)), torch.arange(5))
        model(torch.randint(0, 300, (limit + 1, 1)), torch.tensor([5]))
        assert calls == []
        model(torch.randint(0, 300, (limit, 1)), torch.tensor([6]))
        model(torch.randint(0, 300, (1, 1)), torch.tensor([7]))
    assert calls == [limit, 1]  # one call a step, for every layer


def test_eager_steps_gather_the_arguments_once_and_again_for_new_caches(monkeypatch):
    """FusedDecode keeps the op's arguments between eager steps, and gathers them again when setup_caches
    re-allocated the caches (a larger batch): the op then writes the new caches, not the old ones."""
    model = random_model(SMOLLM2_LIKE, "fp32")
    cpu_kernels.use_fused_decode(model)
    gathered = []
    real = cpu_kernels.decode._decode_layers_arguments
    monkeypatch.setattr(cpu_kernels.decode, "_decode_layers_arguments", lambda m: gathered.append(1) or real(m))
    with torch.no_grad():
        for pos in range(3):
            model(torch.tensor([[5]]), torch.tensor([pos]))
        assert len(gathered) == 1
        old = [t for layer in model.layers.values() for t in (layer.attention.kv_cache.k, layer.attention.kv_cache.v)]
        model.setup_caches(2, 64)  # new caches, zeros
        model(torch.tensor([[5]]), torch.tensor([3]))
    assert len(gathered) == 2
    new = [t for layer in model.layers.values() for t in (layer.attention.kv_cache.k, layer.attention.kv_cache.v)]
    for old_cache, new_cache in zip(old, new):
        assert old_cache[0, :, 3].abs().sum() == 0 and old_cache[0, :, :3].abs().sum() > 0
        assert new_cache[0, :, 3].abs().sum() > 0 and new_cache[0, :, :3].abs().sum() == 0


def test_models_it_cannot_take_are_left_alone():
    fp16 = random_model(SMOLLM2_LIKE, "fp32").half()
    assert cpu_kernels.use_fused_decode(fp16) == 0  # float16 weights: the row kernels read float32/bfloat16/int8
    no_caches = Transformer(SMOLLM2_LIKE)
    assert cpu_kernels.use_fused_decode(no_caches) == 0
    bf16_caches = random_model(SMOLLM2_LIKE, "fp32")
    bf16_caches.setup_caches(1, 32, dtype=torch.bfloat16)
    assert cpu_kernels.use_fused_decode(bf16_caches) == SMOLLM2_LIKE.n_layers  # caches are checked at a step:
    assert bf16_caches.decode_layers(bf16_caches, torch.randn(1, 1, 576), bf16_caches.rope[:1],
                                     torch.tensor([0])) is None  # bf16 ones keep the modules
    bf16_caches.decode_layers = None
    one_odd_layer = random_model(SMOLLM2_LIKE, "fp32")
    one_odd_layer.layers["1"].attention.wo = torch.nn.Linear(576, 576, bias=True)  # a bias: not a gemv layer
    assert cpu_kernels.use_fused_decode(one_odd_layer) == 0
    assert all(m.decode_layers is None for m in (fp16, no_caches, bf16_caches, one_odd_layer))


def test_bad_input_is_a_clear_error():
    model = random_model(SMOLLM2_LIKE, "fp32", max_batch=2)
    x, rope = torch.randn(1, 1, 576), model.rope[torch.tensor([3])]
    with pytest.raises(RuntimeError, match="position 64 is outside the cache"):
        cpu_kernels.decode_layers(model, x, rope, torch.tensor([64]))
    with pytest.raises(RuntimeError, match="x must be \\(B, 1, dim\\)"):
        cpu_kernels.decode_layers(model, torch.randn(1, 2, 576), rope, torch.tensor([3]))
    with pytest.raises(RuntimeError, match="cache row 2 is outside the cache \\(2 rows\\)"):
        cpu_kernels.decode_layers(model, x, rope, torch.tensor([3]), torch.tensor([2]))
    with pytest.raises(RuntimeError, match="position 3 of cache row 1 is given twice"):
        cpu_kernels.decode_layers(model, torch.randn(2, 1, 576), model.rope[torch.tensor([3, 3])],
                                  torch.tensor([3, 3]), torch.tensor([1, 1]))
    block = model.layers["0"]
    cache = block.attention.kv_cache
    norms = [block.attention_norm.weight, block.ffn_norm.weight]
    step = (rope.view(1, 1, 32, 2), torch.tensor([3]), torch.tensor([0]))
    with pytest.raises(RuntimeError, match="for 1 layers, 2 norms, 14 linear tensors and 7 group sizes"):
        torch.ops.torchchat.decode_layers(x, norms, 1e-5, [None] * 12, [0] * 7, [cache.k], [cache.v], *step)
    with pytest.raises(RuntimeError, match="weight shapes do not make a block"):
        torch.ops.torchchat.decode_layers(x, norms, 1e-5, [block.attention.wk.weight, None] * 7, [0] * 7,
                                          [cache.k], [cache.v], *step)
    with pytest.raises(RuntimeError, match="1 sequences need 1 positions and 1 cache rows, got 1 and 2"):
        linears = [t for layer in cpu_kernels.decode._block_linears(block) for t in layer.gemv_operands()[:2]]
        torch.ops.torchchat.decode_layers(x, norms, 1e-5, linears, [0] * 7, [cache.k], [cache.v], step[0], step[1],
                                          torch.tensor([0, 1]))


def test_compiled_step_writes_the_caches_in_place():
    """A compiled decode step of two sequences at their own positions in their own cache rows traces the op, gives
    the eager step's logits, and Inductor keeps the op's cache arguments as the
    model's buffers (no copy of every cache each token)."""
    from torch._inductor.utils import run_and_get_code

    model = random_model(SMOLLM2_LIKE, "fp32", max_batch=3)
    cpu_kernels.use_fused_decode(model)
    step = torch.compile(lambda t, p, r: model(t, p, r)[:, -1], fullgraph=True, dynamic=False)
    tokens, positions, rows = torch.tensor([[5], [6]]), torch.tensor([[3], [9]]), torch.tensor([2, 0])
    with torch.no_grad():
        before = caches(model)
        compiled, (code, *_) = run_and_get_code(step, tokens, positions, rows)
        set_caches(model, before)
        eager = model(tokens, positions, rows)[:, -1]
    assert code.count("torch.ops.torchchat.decode_layers.default(") == 1
    assert "copy_" not in code and ".clone()" not in code, code
    # Inductor fuses the final norm its own way: measured 1.9e-7 of the largest logit apart
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-6 * eager.abs().max().item())


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_generator_tokens_with_and_without_the_fused_blocks(tiny_model, compile):
    """A CPU LocalGenerator fuses its blocks; its greedy tokens equal the unfused generator's, over two turns."""
    fused, plain = (local_generator(tiny_source(tiny_model), compile=compile) for _ in range(2))
    assert isinstance(fused.model.decode_layers, cpu_kernels.FusedDecode)
    plain.model.decode_layers = None
    for prompt in ("Once upon a time", "The cat"):
        want = plain.complete(Turn(plain.encode_prompt(prompt), GREEDY))[0].tokens
        got = fused.complete(Turn(fused.encode_prompt(prompt), GREEDY))[0].tokens
        assert got == want and len(got) == GREEDY.max_new_tokens


def test_the_block_ops_linear_order_is_the_one_python_declares():
    """The op reads a block's linears by index (decode_layers.cpp's LinearIndex); torchchat.cpu.BLOCK_LINEARS is
    the one order the Python side writes, and builds the op's arguments from. The two must agree."""
    source = (Path(cpu_kernels.kernels.CSRC) / "decode_layers.cpp").read_text()
    enum = re.search(r"enum LinearIndex \{([^}]*)\}", source).group(1)
    names = re.findall(r'"(\w+)"', re.search(r"kLinearNames = \{([^}]*)\}", source).group(1))
    by_index = [name.strip()[1:].lower() for name in enum.split(",")]  # kWq -> wq
    assert by_index == names == [path.rpartition(".")[2] for path in cpu_kernels.BLOCK_LINEARS]
    block = Transformer(SMOLLM2_LIKE).layers["0"]
    assert cpu_kernels.decode._block_linears(block) == tuple(block.get_submodule(p) for p in cpu_kernels.BLOCK_LINEARS)
