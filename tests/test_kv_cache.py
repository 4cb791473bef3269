"""The KV cache's dtype on CPU: float16 by default (torchchat.cpu.install), read by the modules' attention
(prefill, batches, no kernels) and by the CPU decode kernels; greedy tokens of the real SmolLM2 against a float32
cache."""

import io

import pytest
import torch

from tests.generators import load_parts
from torchchat import cpu
from torchchat.catalog import ModelSource
from torchchat.generate.base import GenerationArgs, Turn
from torchchat.generate.local import LocalGenerator
from torchchat.model import ModelArgs, Transformer

ARGS = ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, hidden_dim=256)


def random_model(dtype=torch.float32) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ARGS).eval()
    for p in model.parameters():  # a trained model's scale: activations stay O(1)
        p.data.normal_(0, 0.5 / p.size(-1) ** 0.5) if p.dim() == 2 else p.data.uniform_(0.5, 1.5)
    return model.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_caches_are_float16_unless_asked(dtype):
    plain = random_model(dtype)
    plain.setup_caches(1, 16)
    assert plain.layers["0"].attention.kv_cache.k.dtype == dtype  # the plain model: its parameters' dtype
    model = random_model(dtype)
    cpu.install(model)
    model.setup_caches(1, 16)
    assert {layer.attention.kv_cache.k.dtype for layer in model.layers.values()} == {torch.float16}
    other = random_model(dtype)
    cpu.install(other)
    other.setup_caches(1, 16, dtype=torch.float32)
    assert other.layers["0"].attention.kv_cache.v.dtype == torch.float32


def stores_float16_values(cache):
    """An update for a float32 cache that stores k and v rounded to float16 (written here, not KVCache.update:
    the reference must not share the code under test)."""
    def update(input_pos, k, v, rows):  # k, v (B, n_kv_heads, T, head_dim); the test's rows are 0 .. B-1
        assert rows is None and input_pos.dim() == 1
        cache.k[: k.size(0), :, input_pos] = k.half().float()
        cache.v[: v.size(0), :, input_pos] = v.half().float()
        return cache.k, cache.v
    return update


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_modules_attend_over_a_float16_cache(dtype):
    """No kernels (the plain modules): a prompt, a batch-2 prompt and decode steps over a float16 cache give
    exactly the logits of a float32 cache holding the same float16-rounded keys and values (attention in float32
    either way; a mutation that stores values at bf16 precision or attends in fp16 is off by 1.8e-3 and 2.7e-4 of
    the largest logit), and those of an unrounded float32 cache to float16's rounding: within 4e-4 of the largest
    logit (measured 2.0e-4 here, 2.5e-4 to 3.3e-4 with other random prompts), or exactly with bf16 weights (their
    keys and values fit float16)."""
    models = {}
    for name, cache_dtype in (("float16", torch.float16), ("rounded", torch.float32), ("float32", torch.float32)):
        models[name] = cpu.as_cpu(random_model(dtype))  # the CPU attention (float32), no kernels
        models[name].setup_caches(2, 32, dtype=cache_dtype)
    for layer in models["rounded"].layers.values():
        layer.attention.kv_cache.update = stores_float16_values(layer.attention.kv_cache)
    prompt = torch.randint(0, ARGS.vocab_size, (2, 9))
    steps = torch.randint(0, ARGS.vocab_size, (2, 3))
    logits = {}
    with torch.no_grad():
        for name, model in models.items():
            out = [model(prompt, torch.arange(9))]
            out += [model(steps[:, i:i + 1], torch.tensor([9 + i])) for i in range(3)]
            out += [model(steps[:1, :1], torch.tensor([12]))]  # one sequence: batch 1 of the batch-2 cache
            logits[name] = out
    bound = 4e-4 if dtype is torch.float32 else 0.0
    for half, rounded, full in zip(logits["float16"], logits["rounded"], logits["float32"]):
        assert half.dtype == dtype
        assert torch.equal(half, rounded)
        torch.testing.assert_close(half.float(), full.float(), rtol=0, atol=bound * full.float().abs().max().item())


# Greedy tokens of the real model, float32 weights: measured 384/384 identical over six chat prompts x 64 tokens
# (and the same for bf16 and int8 weights; int4 183/384, which agrees with float32 weights more often with the
# float16 cache than with the float32 one: 217 against 197 of 384).
QUESTIONS = ["What is the capital of France?", "Write a short poem about the sea.", "Explain what a CPU cache is."]
GREEDY = GenerationArgs(max_new_tokens=32, temperature=0, top_k=None, seed=0)


def test_smollm2_greedy_tokens_with_a_float16_cache_are_the_float32_caches(smollm2_gguf):
    source = ModelSource("smollm2-135m", gguf_path=smollm2_gguf)
    outputs = {}
    for cache_dtype in (torch.float16, torch.float32):
        model, tokenizer, chat_format = load_parts(source)
        model.setup_caches(1, 128, dtype=cache_dtype)  # LocalGenerator keeps caches of the same size
        gen = LocalGenerator(model, tokenizer, chat_format, max_seq_len=128, out=io.StringIO(), err=io.StringIO())
        assert model.layers["0"].attention.kv_cache.k.dtype == cache_dtype
        prompts = [chat_format.encode_turn([{"role": "user", "content": q}], first=True) for q in QUESTIONS]
        outputs[cache_dtype] = [[step[0] for step in gen.generate_tokens(Turn(p, GREEDY))] for p in prompts]
    same = sum(a == b for x, y in zip(outputs[torch.float16], outputs[torch.float32]) for a, b in zip(x, y))
    total = sum(len(x) for x in outputs[torch.float32])
    assert total == len(QUESTIONS) * GREEDY.max_new_tokens
    assert same / total >= 0.9, f"{same}/{total} greedy tokens identical with float16 and float32 caches"
