"""Weight-only int8/int4 quantization: kernels against float32, a quantized model generates, SmolLM2 agreement."""

import io

import pytest
import torch
import torch.nn as nn

from tests.generators import load_parts, local_generator, tiny_source
from torchchat.catalog import ModelSource
from torchchat.generate.base import GenerationArgs, Turn
from torchchat.generate.local import LocalGenerator
from torchchat.errors import ConfigError
from torchchat import cpu as cpu_kernels
from torchchat.quantize import Int4Linear, Int4PackedLinear, Int8Linear, int4_group_size, quantize_model

GREEDY = GenerationArgs(max_new_tokens=32, temperature=0, top_k=None, seed=0)


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).norm() / ref.norm()).item()


@pytest.fixture()
def linear():
    torch.manual_seed(0)
    return nn.Linear(256, 96, bias=False)


# One row (a decode step, the kernels) and 40 rows (a prompt: int8 takes the float32 GEMM path).
@pytest.mark.parametrize("rows", [1, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_is_close_to_float(linear, rows, dtype):
    x = torch.randn(1, rows, 256)
    y = Int8Linear.from_linear(linear)(x.to(dtype))
    assert y.shape == (1, rows, 96) and y.dtype == dtype
    assert relative_error(y, linear(x)) < 0.02  # measured ~0.005 (fp32), ~0.008 (bf16)


# torchchat's layout (the gemv_int4 op for one row, float32 GEMMs for more) and aten's (where the op is unavailable).
INT4_LAYOUTS = [Int4Linear, Int4PackedLinear]


@pytest.mark.parametrize("layout", INT4_LAYOUTS)
@pytest.mark.parametrize("rows", [1, 5, 40])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_linear_is_close_to_float(linear, rows, group_size, layout):
    x = torch.randn(1, rows, 256)
    y = layout.from_linear(linear, group_size)(x)
    assert y.shape == (1, rows, 96) and y.dtype == torch.float32
    # 16 levels over each group's range: ~0.06 relative error on uniform random weights (measured).
    assert relative_error(y, linear(x)) < 0.1


@pytest.mark.parametrize("layout,tolerance", [(Int4Linear, 0.001), (Int4PackedLinear, 0.01)])
def test_int4_reproduces_weights_already_on_its_grid(layout, tolerance):
    """A weight that is already 4-bit per group (as SmolLM2's Q4_1 GGUF weights are) survives int4 exactly,
    up to the rounding of scale and zero (float16 in torchchat's layout, bfloat16 in aten's)."""
    torch.manual_seed(0)
    q = torch.randint(0, 16, (64, 128)).float()
    scale, low = torch.rand(64, 4, 1) * 0.01 + 0.001, torch.randn(64, 4, 1) * 0.01
    q[:, ::32], q[:, 1::32] = 0, 15  # every group spans the full range, so min-max finds the same grid
    linear = nn.Linear(128, 64, bias=False)
    with torch.no_grad():
        linear.weight.copy_((q.view(64, 4, 32) * scale + low).view(64, 128))
    eye = torch.eye(128)
    dequantized = layout.from_linear(linear, 32)(eye).t()  # (64, 128)
    assert relative_error(dequantized, linear.weight) < tolerance  # measured ~0.0003 (fp16), ~0.004 (bf16)


def test_int4_group_size_follows_the_kernel_constraints():
    assert int4_group_size(576, 1536) == 32
    assert int4_group_size(576, 1536, preferred=128) == 64  # 576 is not a multiple of 128
    assert int4_group_size(2048, 8192, preferred=128) == 128
    assert int4_group_size(576, 100) is None  # out_features must be a multiple of 16
    assert int4_group_size(48, 64) is None  # no supported group size divides 48


def test_quantize_model_skips_unsupported_shapes_and_counts():
    model = nn.Sequential(nn.Linear(64, 32, bias=False), nn.Linear(32, 8, bias=False), nn.Linear(8, 8))
    assert quantize_model(model, "int4") == {"quantized": 1, "skipped": 1}  # the biased one is not touched
    int4 = Int4Linear if cpu_kernels.available() else Int4PackedLinear
    assert type(model[0]) is int4 and type(model[1]) is nn.Linear and type(model[2]) is nn.Linear


def test_unknown_scheme_is_a_config_error():
    with pytest.raises(ConfigError, match="int8, int4"):
        quantize_model(nn.Sequential(nn.Linear(8, 8)), "int3")


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_tiny_model_generates(tiny_model, scheme):
    gen = local_generator(tiny_source(tiny_model))
    reference = gen.complete(Turn(gen.encode_prompt("Once upon a time"), GREEDY))[0]
    counts = quantize_model(gen.model, scheme)
    assert counts["quantized"] == 4 * 7 + 1 and counts["skipped"] == 0  # 7 linears a layer, and the output
    assert isinstance(gen.model.output, Int8Linear)  # int8 even under int4: it picks every token
    completion = gen.complete(Turn(gen.encode_prompt("Once upon a time"), GREEDY))[0]
    # Random weights may reach a stop token before 32 (int8 at token 32 here): then it says so.
    assert len(completion.tokens) == 32 or completion.finish_reason == "stop"
    assert all(0 <= t < tiny_model.args.vocab_size for t in completion.tokens)
    assert completion.tokens[0] == reference.tokens[0]  # the prompt's argmax survives even int4 on random weights


def test_from_source_quantizes(tiny_model):
    _, tokenizer, chat_format = load_parts(tiny_source(tiny_model))
    gen = LocalGenerator.from_source(tiny_source(tiny_model), tokenizer, chat_format, max_seq_len=64,
                                     quantize="int8", out=io.StringIO(), err=io.StringIO())
    assert isinstance(gen.model.layers["0"].attention.wq, Int8Linear)
    assert len(gen.complete(Turn(gen.encode_prompt("Hi"), GREEDY))[0].tokens) == 32


# Greedy agreement with float32 on the real model: the first 32 tokens of 3 chat prompts. Greedy text
# drifts from float32 wherever a near-tie flips, and then the rest of that answer differs. Measured here:
# int8 82% (79/96; one-row steps through torchchat's int8 rows with float32 scales, activations in float32,
# since 2026-11-25 in int16: the same 79/96), int4 73% (70/96; torchchat::gemv_int4, float16 scales, int8
# activations in blocks of 32; 92/96 since the fused decode block, whose float32 reference changed too;
# aten's kernel with bf16 scales and activations: 62%). Broken variants measured: int4 on the output layer as well 18%,
# int8 with every scale 20% too large 19%.
AGREEMENT = {"int8": 0.8, "int4": 0.6}
QUESTIONS = ["What is the capital of France?", "Write a short poem about the sea.", "Explain what a CPU cache is."]


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_gguf):
    source = ModelSource("smollm2-135m", gguf_path=smollm2_gguf)
    model, tokenizer, chat_format = load_parts(source)
    prompts = [chat_format.encode_turn([{"role": "user", "content": q}], first=True) for q in QUESTIONS]
    return source, prompts, greedy(model, tokenizer, chat_format, prompts)


def greedy(model, tokenizer, chat_format, prompts) -> list[list[int]]:
    gen = LocalGenerator(model, tokenizer, chat_format, max_seq_len=128, out=io.StringIO(), err=io.StringIO())
    return [[step[0] for step in gen.generate_tokens(Turn(p, GREEDY))] for p in prompts]


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_smollm2_quantized_greedy_agrees_with_float32(smollm2_reference, scheme):
    source, prompts, reference = smollm2_reference
    model, tokenizer, chat_format = load_parts(source)
    quantize_model(model, scheme)
    outputs = greedy(model, tokenizer, chat_format, prompts)
    same = sum(a == b for ref, out in zip(reference, outputs) for a, b in zip(ref, out))
    total = sum(len(ref) for ref in reference)
    print(f"{scheme}: {same}/{total} greedy tokens identical to float32")
    assert same / total >= AGREEMENT[scheme], f"{scheme}: {same}/{total} greedy tokens identical to float32"
