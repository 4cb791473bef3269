"""A quantized GGUF runs in its own quantization: its blocks go straight into quantized layers (never through a
float copy), each layer holding exactly the values the file holds; ``--dtype`` dequantizes it as before."""

import subprocess
import sys

import pytest
import torch
from gguf import GGMLQuantizationType as QType

from tests.checkpoint_assets import TINY, logits_of, model_from, random_state_dict, write_gguf
from tests.cli_process import ROOT, torchchat
from torchchat.checkpoint import CheckpointError, load_model
from torchchat.quantize import Int4Embedding, Int4Linear, Int8Embedding, Int8Linear

TIED = TINY.with_(tie_embeddings=True)
TOKENS = [1, 17, 42, 5, 95, 0, 63]
# One file, every type the loader keeps quantized, as llama.cpp's mixes put them: Q8_0 embedding (SmolLM2's), Q4_0
# attention, Q4_1 feed-forward, a Q8_0 layer among them.
MIXED = {"tok_embeddings.weight": QType.Q8_0, "layers.0.attention.wq.weight": QType.Q4_0,
         "layers.0.attention.wk.weight": QType.Q4_0, "layers.1.feed_forward.w2.weight": QType.Q8_0}
LAYOUT = {QType.Q4_0: Int4Linear, QType.Q4_1: Int4Linear, QType.Q8_0: Int8Linear}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """(source, the tensors the file holds dequantized) of a tied TINY model of Q4_0, Q4_1 and Q8_0 matrices."""
    state = random_state_dict(TIED)
    del state["output.weight"]
    return write_gguf(tmp_path_factory.mktemp("mixed") / "tiny.gguf", state, TIED, qtype=QType.Q4_1, qtypes=MIXED)


def dequantized(module) -> torch.Tensor:
    """The float32 weight a quantized layer computes with."""
    return module.dequantize() if isinstance(module, Int4Linear) else module.dequantize(torch.float32)


def test_quantized_blocks_become_layers_holding_the_files_values(mixed):
    source, held = mixed
    model = load_model(source, TIED, keep_quantized=True)
    for name, value in held.items():
        if value.dim() != 2 or name == "tok_embeddings.weight":
            continue
        module = model.get_submodule(name.removesuffix(".weight"))
        assert type(module) is LAYOUT[MIXED.get(name, QType.Q4_1)], name
        assert torch.equal(dequantized(module), value), name
    ids = torch.tensor([[3, 0, 95, 17]])
    assert isinstance(model.tok_embeddings, Int8Embedding)
    assert torch.equal(model.tok_embeddings(ids)[0], held["tok_embeddings.weight"][ids[0]])
    assert not [n for n, p in model.named_parameters() if p.dim() == 2], "a matrix was left in float"


def test_a_tied_output_reads_the_embeddings_own_buffers(mixed):
    source, held = mixed
    model = load_model(source, TIED, keep_quantized=True)
    assert isinstance(model.output, Int8Linear)
    assert model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()
    assert torch.equal(dequantized(model.output), held["tok_embeddings.weight"])


@pytest.mark.parametrize("embedding_type", [QType.Q4_1, QType.Q8_0])
def test_an_untied_output_and_a_4bit_embedding(tmp_path, embedding_type):
    state = random_state_dict(TINY)
    source, held = write_gguf(tmp_path / "untied.gguf", state, TINY, qtype=QType.Q4_1,
                              qtypes={"tok_embeddings.weight": embedding_type, "output.weight": QType.Q8_0})
    model = load_model(source, TINY, keep_quantized=True)
    assert isinstance(model.tok_embeddings, Int4Embedding if embedding_type == QType.Q4_1 else Int8Embedding)
    assert isinstance(model.output, Int8Linear)
    assert torch.equal(dequantized(model.output), held["output.weight"])
    ids = torch.tensor([[95, 3, 3, 0]])
    assert torch.equal(model.tok_embeddings(ids)[0], held["tok_embeddings.weight"][ids[0]])


def test_quantized_layers_compute_what_the_dequantized_model_does(mixed):
    """The quantized model's logits against the float32 model of the values the file holds: the difference is the
    kernels' rounding of the activations to int8 blocks (as llama.cpp's), measured 4.1e-3 of the largest logit."""
    source, held = mixed
    quantized = logits_of(load_model(source, TIED, keep_quantized=True), TOKENS)
    reference = logits_of(model_from({**held, "output.weight": held["tok_embeddings.weight"]}, TIED), TOKENS)
    dequant = logits_of(load_model(source, TIED), TOKENS)  # --dtype fp32: today's path
    assert torch.equal(dequant, reference)
    assert (quantized - reference).abs().max() <= 1e-2 * reference.abs().max()


def test_a_truncated_quantized_tensor_names_itself(tmp_path):
    """Loading stays strict: blocks that do not fill the header's shape are refused, by name, before use."""
    state = random_state_dict(TINY)
    source, _ = write_gguf(tmp_path / "model.gguf", state, TINY, qtype=QType.Q4_1)
    data = bytearray(source.gguf_path.read_bytes())
    source.gguf_path.write_bytes(bytes(data[:-4096]))  # the last tensors' bytes are cut
    with pytest.raises(CheckpointError, match="output.weight|ffn|attn|runs past the end"):
        load_model(source, TINY, keep_quantized=True)


# ----- the default model, as a user runs it -----

LOAD_MEMORY = """
import resource
from torchchat.catalog import resolve_model
from torchchat.checkpoint import load_model, read_model_args
source = resolve_model()
args = read_model_args(source)
import torchchat.quantize  # the runtime's imports, before the measurement
before = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
model = load_model(source, args, keep_quantized={keep})
# VmHWM: this process's own peak (ru_maxrss is carried over from the parent at fork and exec: after tests that grew
# pytest's process, it read pytest's size)
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) * 1024
print(peak - before)
"""


def load_bytes(keep_quantized: bool) -> int:
    """How far loading the default model raises a fresh process's peak RSS above what it held before (bytes)."""
    proc = subprocess.run([sys.executable, "-c", LOAD_MEMORY.format(keep=keep_quantized)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; pages are given back on Linux only")
def test_the_default_model_loads_in_the_files_size(smollm2_gguf):
    """Loading straight into quantized layers holds no float copy, and gives the file's pages back once read: the load
    adds at most 1.3x the file's size to the peak (measured 1.06-1.14x for the 98 MB file; reading it through the
    float32 path adds 5.5-5.7x, keeping its pages in memory too 2.0x)."""
    size = smollm2_gguf.stat().st_size
    quantized = load_bytes(True)
    assert quantized <= 1.3 * size, (quantized / size)
    assert load_bytes(False) > 4 * size  # the measurement sees a float copy when there is one


def test_the_default_runs_quantized_and_dtype_dequantizes(smollm2_gguf):
    greedy = ("generate", "--prompt", "The capital of France is", "--max-new-tokens", "8", "--temperature", "0")
    native, fp32 = torchchat(*greedy), torchchat(*greedy, "--dtype", "fp32")
    assert native.returncode == 0 and fp32.returncode == 0, native.stderr + fp32.stderr
    assert "loaded smollm2-135m (int4 x210, int8 x2, fp32 activations, cpu)" in native.stderr
    assert "loaded smollm2-135m (fp32, cpu)" in fp32.stderr
    assert "Paris" in native.stdout and "Paris" in fp32.stdout
