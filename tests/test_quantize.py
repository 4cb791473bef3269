"""Weight-only int8/int4 quantization: kernels against float32, a quantized model generates, SmolLM2 agreement."""

import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.generators import load_parts, local_generator, tiny_source
from torchchat.catalog import ModelSource
from torchchat.generate.base import GenerationArgs, Turn
from torchchat.generate.local import LocalGenerator
from torchchat.errors import ConfigError
from torchchat import cpu as cpu_kernels
from torchchat.quantize import (Int4Linear, Int4PackedLinear, Int8Embedding, Int8Linear, int4_group_size,
                                 quantize_model)
from torchchat.model import Transformer

GREEDY = GenerationArgs(max_new_tokens=32, temperature=0, top_k=None, seed=0)


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).norm() / ref.norm()).item()


@pytest.fixture()
def linear():
    torch.manual_seed(0)
    return nn.Linear(256, 96, bias=False)


# One row (a decode step, the kernels) and 40 rows (a prompt: int8 takes the float32 GEMM path); a scale a row
# and a scale a block of 32 (a GGUF's Q8_0).
@pytest.mark.parametrize("blocks", [False, True], ids=["rows", "blocks"])
@pytest.mark.parametrize("rows", [1, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_is_close_to_float(linear, rows, dtype, blocks):
    x = torch.randn(1, rows, 256)
    y = Int8Linear.from_linear(linear, blocks=blocks)(x.to(dtype))
    assert y.shape == (1, rows, 96) and y.dtype == dtype
    # measured ~0.005 (fp32), ~0.008 (bf16) a row; in blocks 0.004-0.005 (fp32 and bf16; 0.008 in bf16 when the
    # block form rounded x to int8 in blocks of 32)
    assert relative_error(y, linear(x)) < 0.02


def on_int8_block_grid(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q (rows, cols) int8 and float16 scales (rows, cols / 32), every block reaching +-127 (as llama.cpp's
    quantizer leaves a Q8_0 block)."""
    q = torch.randint(-127, 128, (rows, cols), dtype=torch.int8)
    q[:, ::32] = 127
    return q, (torch.rand(rows, cols // 32) * 0.01 + 1e-4).half()


def test_int8_blocks_reproduce_weights_already_on_their_grid():
    """A weight that is q * d for a Q8_0 block's float16 d (as a GGUF's Q8_0 tensor dequantizes) quantizes back to
    the same q and d, bit for bit; dequantize() is that product."""
    torch.manual_seed(0)
    q, scales = on_int8_block_grid(48, 160)
    weight = (q.float().view(48, 5, 32) * scales.float()[..., None]).view(48, 160)
    linear = nn.Linear(160, 48, bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    layer = Int8Linear.from_linear(linear, blocks=True)
    assert torch.equal(layer.weight, q) and torch.equal(layer.scales, scales)
    assert torch.equal(layer.dequantize(), weight) and layer.gemv_operands()[2] == 32


@pytest.mark.parametrize("rows", [1, 5, 40])
def test_int8_blocks_without_the_kernels_are_float32_products(linear, rows, monkeypatch):
    """TORCHCHAT_CPU_KERNELS=0 (and prompts with them): the block form is a float32 GEMM on the dequantized weight,
    the same values F.linear gives."""
    layer = Int8Linear.from_linear(linear, blocks=True)
    x = torch.randn(rows, 256)
    monkeypatch.setattr(cpu_kernels.kernels, "available", lambda: False)
    assert torch.equal(layer(x), F.linear(x, layer.dequantize()))


def test_int8_forms_are_checked():
    q = torch.zeros(8, 64, dtype=torch.int8)
    with pytest.raises(ValueError, match="scales \\(8, 2\\) float16"):
        Int8Linear(q, torch.zeros(8, 2))  # float32 block scales
    with pytest.raises(ValueError, match="scales \\(8,\\) or \\(8, 2\\)"):
        Int8Linear(q, torch.zeros(4))
    with pytest.raises(ValueError, match="a multiple of 32"):
        Int8Embedding(torch.zeros(8, 48, dtype=torch.int8), torch.zeros(8, 1).half())


def test_int8_embedding_gathers_dequantized_rows_and_ties_an_output_layer():
    """Rows of the table times their block scales, in float32; the tied output layer reads the very same buffers."""
    torch.manual_seed(0)
    embedding = Int8Embedding(*on_int8_block_grid(100, 64))
    tokens = torch.randint(0, 100, (3, 7))
    table = embedding.dequantize()  # (100, 64)
    out = embedding(tokens)
    assert out.shape == (3, 7, 64) and out.dtype == torch.float32
    assert torch.equal(out, F.embedding(tokens, table))
    output = Int8Linear.tied_to(embedding)
    assert output.weight is embedding.weight and output.scales is embedding.scales  # no copy
    assert output.blocks and torch.equal(output.dequantize(), table)


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
# aten's kernel with bf16 scales and activations: 62%). int8 in blocks of 32 (a Q8_0 GGUF as it runs: the
# embedding and the tied output layer on the file's own grid, the block linears re-quantized) 100% (96/96) with the
# activations in int16 with a scale a row; 67% (64/96) when they were rounded to int8 in blocks of 32, as llama.cpp
# rounds them: the first answer token of the first question is a near-tie (top two float32 logits 25.330 and 25.244)
# that this rounding flips (the output layer alone in blocks flips it too). Broken variants measured: int4 on the
# output layer as well 18%, int8 with every scale 20% too large 19%.
AGREEMENT = {"int8": 0.8, "int8-blocks": 0.9, "int4": 0.6}
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


@pytest.mark.parametrize("scheme", ["int8", "int8-blocks", "int4"])
def test_smollm2_quantized_greedy_agrees_with_float32(smollm2_reference, scheme):
    source, prompts, reference = smollm2_reference
    model, tokenizer, chat_format = load_parts(source)
    if scheme == "int8-blocks":
        in_int8_blocks(model)
    else:
        quantize_model(model, scheme)
    outputs = greedy(model, tokenizer, chat_format, prompts)
    same = sum(a == b for ref, out in zip(reference, outputs) for a, b in zip(ref, out))
    total = sum(len(ref) for ref in reference)
    print(f"{scheme}: {same}/{total} greedy tokens identical to float32")
    assert same / total >= AGREEMENT[scheme], f"{scheme}: {same}/{total} greedy tokens identical to float32"


def in_int8_blocks(model: Transformer) -> Transformer:
    """The model as a Q8_0 GGUF loads: the embedding, the output layer tied to it and every block linear in int8
    blocks of 32."""
    model.tok_embeddings = Int8Embedding.from_embedding(model.tok_embeddings)
    model.output = Int8Linear.tied_to(model.tok_embeddings)
    for parent in list(model.layers.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, Int8Linear.from_linear(child, blocks=True))
    return model


def dequantized(model: Transformer, like: Transformer) -> Transformer:
    """``like`` (a float32 model of the same shape) given ``model``'s int8-block weights, dequantized."""
    with torch.no_grad():
        table = model.tok_embeddings.dequantize()
        like.tok_embeddings.weight.copy_(table)
        like.output.weight = like.tok_embeddings.weight  # tied
        for name, module in model.layers.named_modules():
            if isinstance(module, Int8Linear):
                like.layers.get_submodule(name).weight.copy_(module.dequantize())
    return like


def test_tiny_model_in_int8_blocks_runs_on_the_kernels_close_to_float32(tiny_model, monkeypatch):
    """A model as a Q8_0 GGUF holds it (Int8Embedding, the tied Int8Linear output over its buffers, block linears)
    takes the CPU kernels (cpu.install: the blocks fused, the output layer through gemv in blocks) with no float copy
    of the table. Logits of a prompt and 24 decode steps, against the same weights dequantized to float32 (torch's
    modules): the kernels round activations to int16 with a scale a row, as for int8 rows: measured 0.0005 (prompt)
    and at most 0.0042 (decode) of the largest logit on this random model (0.026 and 0.056 when they rounded them to
    int8 in blocks of 32, as llama.cpp does; int4's kernels: 0.023, 0.16). Without the kernels: the float32 model's
    logits exactly."""
    model = in_int8_blocks(load_parts(tiny_source(tiny_model))[0])
    reference = dequantized(model, load_parts(tiny_source(tiny_model))[0])
    assert cpu_kernels.install(model)["fused"] == tiny_model.args.n_layers
    assert model.output.weight is model.tok_embeddings.weight
    assert not any(t.dtype == torch.float32 and t.numel() >= tiny_model.args.vocab_size * tiny_model.args.dim
                   for t in model.state_dict().values())  # no float copy of the table
    torch.manual_seed(0)
    tokens = torch.randint(0, tiny_model.args.vocab_size, (1, 32))
    calls = []
    real = torch.ops.torchchat.gemv
    with monkeypatch.context() as m:
        m.setattr(torch.ops.torchchat, "gemv", lambda *a: calls.append(a[2].dtype) or real(*a))
        got = teacher_forced_logits(model, tokens)
    # in blocks: the 8-token prompt in each block linear and the output, then the output layer of each step
    assert calls == [torch.float16] * (7 * tiny_model.args.n_layers + 1 + 24)
    want = teacher_forced_logits(reference, tokens)
    for g, w in zip(got, want):
        assert ((g - w).abs().max() / w.abs().max()).item() < 0.02
    monkeypatch.setattr(cpu_kernels.kernels, "available", lambda: False)
    plain = in_int8_blocks(load_parts(tiny_source(tiny_model))[0])
    for g, w in zip(teacher_forced_logits(plain, tokens), want):
        assert torch.equal(g, w)


def teacher_forced_logits(model: Transformer, tokens: torch.Tensor, prompt: int = 8) -> list[torch.Tensor]:
    """The last position's logits after tokens[:, :prompt], then after each further token, one step at a time."""
    model.setup_caches(1, 64)
    with torch.no_grad():
        out = [model(tokens[:, :prompt], torch.arange(prompt))[:, -1]]
        out += [model(tokens[:, i:i + 1], torch.tensor([i]))[:, -1] for i in range(prompt, tokens.size(1))]
    return out
