"""Random-weight models with the CPU kernels' linears and caches, and scrambled batch steps: shared by the tests of
the block op (test_decode_layers.py) and of the kernels' pool (test_work_pool.py)."""

import torch

from torchchat import cpu as cpu_kernels
from torchchat.model import ModelArgs, Transformer
from torchchat.quantize import Int8Linear, quantize_model


def random_model(args: ModelArgs, weights: str, seed: int = 0, cache_dtype=None, max_batch: int = 1) -> Transformer:
    """A random-weight model with the CPU kernels' linears (as LocalGenerator sets them), caches of max_batch rows
    of 64 positions (the CPU default, float16, or cache_dtype), not yet fused. weights: fp32, bf16, int8, int8-blocks
    (the block linears in int8 blocks of 32, a GGUF's Q8_0), int4 (group size 32), int4-g64."""
    torch.manual_seed(seed)
    model = Transformer(args).eval()
    for p in model.parameters():  # weights of a trained model's scale: activations stay O(1) through the layers
        p.data.normal_(0, 0.5 / p.size(-1) ** 0.5) if p.dim() == 2 else p.data.uniform_(0.5, 1.5)
    if weights == "bf16":
        model.to(torch.bfloat16)
    if weights == "int8-blocks":
        in_blocks(model)
    elif weights.startswith("int"):
        quantize_model(model, weights[:4], group_size=64 if weights.endswith("g64") else 32)
    cpu_kernels.use_gemv(model)
    model.setup_caches(max_batch, 64, dtype=cache_dtype)
    cpu_kernels.use_decode_attention(model)
    return model


def in_blocks(model: Transformer):
    """Every block linear as an Int8Linear in blocks of 32, in place."""
    for block in model.layers.values():
        for path in cpu_kernels.BLOCK_LINEARS:
            owner, name = path.split(".")
            parent = getattr(block, owner)
            setattr(parent, name, Int8Linear.from_linear(getattr(parent, name), blocks=True))


BATCH_ARGS = ModelArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, hidden_dim=512)  # head_dim 64
CACHE_ROWS = 10


def random_caches(model: Transformer):
    """Every cache entry random, as prompts of every row would leave them."""
    for layer in model.layers.values():
        for t in (layer.attention.kv_cache.k, layer.attention.kv_cache.v):
            t.copy_(torch.randn(t.shape))


def scrambled_step(model: Transformer, batch: int, seed: int):
    """A step of `batch` sequences in scrambled cache rows at distinct positions: (h (B, 1, dim), rope (B, 1, hd/2, 2),
    input_pos (B,), rows (B,))."""
    torch.manual_seed(seed)
    rows, positions = torch.randperm(CACHE_ROWS)[:batch], torch.randperm(64)[:batch]
    dtype = model.layers["0"].attention_norm.weight.dtype
    h = torch.randn(batch, 1, model.args.dim).to(dtype)
    return h, model.rope[positions].unsqueeze(1), positions, rows
