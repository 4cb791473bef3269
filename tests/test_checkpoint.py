"""Checkpoint loading: each format written by its own writer, loaded, and compared by the model's logits."""

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType
from safetensors.torch import load_file

from tests.checkpoint_assets import (
    TINY, hf_config, logits_of, model_from, random_state_dict, write_gguf, write_hf_dir,
    write_meta_dir, write_pth,
)
from torchchat.catalog import ModelSource
from torchchat.checkpoint import CheckpointError, expected_shapes, load_model, load_state_dict, read_model_args
from torchchat.checkpoints import gguf as gguf_format
from torchchat.checkpoints.meta import meta_hidden_dim
from torchchat.errors import ConfigError
from torchchat.model import KNOWN_MODELS, RopeScaling, Transformer, rope_frequencies

TOKENS = [1, 17, 42, 5, 95, 0, 63]
TIED = TINY.with_(tie_embeddings=True)


@pytest.fixture(scope="module")
def state():
    return random_state_dict(TINY)


@pytest.fixture(scope="module")
def reference_logits(state):
    return logits_of(model_from(state), TOKENS)


def write(fmt: str, path, state, args=TINY):
    """(source, state the file holds) for one format, in its most involved layout."""
    if fmt == "gguf":
        return write_gguf(path / "model.gguf", state, args)
    if fmt == "hf":
        return write_hf_dir(path / "hf", state, args, shards=2)
    if fmt == "meta":
        return write_meta_dir(path / "meta", state, args, shards=2, dtype=torch.float32)
    return write_pth(path / "pth" / "model.pth", state, args)


FORMATS = ["gguf", "hf", "meta", "pth"]


def assert_loads_exactly(source, held, args=TINY):
    assert read_model_args(source) == args
    model = load_model(source, args)
    assert all(p.device.type == "cpu" and not p.requires_grad for p in model.parameters())
    assert not model.training
    torch.testing.assert_close(logits_of(model, TOKENS), logits_of(model_from(held, args), TOKENS),
                               rtol=0, atol=1e-5)


def test_expected_shapes_are_the_models_state_dict():
    for args in (TINY, KNOWN_MODELS["llama3.1-8b"]):
        with torch.device("meta"):
            model = Transformer(args)
        assert expected_shapes(args) == {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_gives_the_original_logits(fmt, tmp_path, state, reference_logits):
    source, held = write(fmt, tmp_path, state)
    assert_loads_exactly(source, held)
    torch.testing.assert_close(logits_of(load_model(source, TINY), TOKENS), reference_logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("qtype", [QType.F16, QType.BF16, QType.Q8_0, QType.Q4_0, QType.Q4_1])
def test_gguf_types_dequantize_to_the_written_values(qtype, tmp_path, state, reference_logits):
    source, held = write_gguf(tmp_path / "model.gguf", state, TINY, qtype)
    assert_loads_exactly(source, held)  # exact against the values the file holds
    # And near the unquantized model: relative RMS error of the logits, measured 3e-4 (F16), 2.5e-3 (BF16),
    # 7e-3 (Q8_0), 0.10-0.12 (Q4_0, Q4_1: 16 levels for uniform random weights, over two layers).
    logits = logits_of(load_model(source, TINY), TOKENS)
    error = (logits - reference_logits).norm() / reference_logits.norm()
    assert error < {QType.F16: 1e-3, QType.BF16: 1e-2, QType.Q8_0: 2e-2}.get(qtype, 0.2), (qtype.name, error)


def test_bf16_directory_loads_as_bfloat16_or_float32(tmp_path, state):
    source, held = write_meta_dir(tmp_path / "meta", state, dtype=torch.bfloat16)
    model = load_model(source, TINY, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert_loads_exactly(source, held)


def test_meta_llama3_embedding_split_and_vocab_from_weights(tmp_path, state):
    source, held = write_meta_dir(tmp_path / "l3", state, embedding_dim=0, dtype=torch.float32, vocab_size=-1)
    assert_loads_exactly(source, held)
    source, held = write_meta_dir(tmp_path / "l2", state, embedding_dim=1, dtype=torch.float32, vocab_size=-1)
    assert_loads_exactly(source, held)


def test_meta_hidden_dim_rule_matches_the_known_models():
    assert meta_hidden_dim(4096, 256, None) == KNOWN_MODELS["llama2-7b"].hidden_dim
    assert meta_hidden_dim(8192, 4096, 1.3) == KNOWN_MODELS["llama2-70b"].hidden_dim
    assert meta_hidden_dim(4096, 1024, 1.3) == KNOWN_MODELS["llama3-8b"].hidden_dim
    assert meta_hidden_dim(2048, 256, 1.5) == KNOWN_MODELS["llama3.2-1b"].hidden_dim


def test_meta_params_max_context_and_scaled_rope(tmp_path, state):
    write_meta_dir(tmp_path / "m", state, dtype=torch.float32, max_seq_len=None, use_scaled_rope=True)
    args = read_model_args(ModelSource("tiny", checkpoint_dir=tmp_path / "m"))
    assert args.max_context == 4096 and args.rope_scaling == RopeScaling()
    args = read_model_args(ModelSource("llama3.2-1b", checkpoint_dir=tmp_path / "m"))  # a known name's values
    assert args.max_context == 131072 and args.rope_scaling.factor == 32.0


def test_gpt_fast_checkpoint_with_fused_wqkv(tmp_path, state):
    params = {"dim": 64, "n_layer": 2, "n_head": 4, "n_local_heads": 2, "vocab_size": 96,
              "intermediate_size": 160, "rope_base": 10000.0, "norm_eps": 1e-5, "block_size": 128}
    source, held = write_pth(tmp_path / "gf" / "model.pth", state, params=params, gpt_fast=True)
    assert_loads_exactly(source, held)


def test_pth_shape_from_known_name_or_error(tmp_path, state):
    write_pth(tmp_path / "p" / "model.pth", state, params={})
    known = ModelSource("stories15m", checkpoint_path=tmp_path / "p" / "model.pth")
    assert read_model_args(known) == KNOWN_MODELS["stories15m"]
    with pytest.raises(CheckpointError, match=r"pass --model .* or put its params.json beside it"):
        read_model_args(ModelSource("model", checkpoint_path=tmp_path / "p" / "model.pth"))


def test_hf_config_details(tmp_path, state):
    write_hf_dir(tmp_path / "hf", state, shards=1)
    rope = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf_config(rope_scaling=rope)))
    source = ModelSource("tiny", checkpoint_dir=tmp_path / "hf")
    assert read_model_args(source).rope_scaling == RopeScaling(32.0, 1.0, 4.0, 8192)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf_config(rope_scaling={"type": "yarn", "factor": 4})))
    with pytest.raises(CheckpointError, match="rope_scaling type 'yarn' is not supported"):
        read_model_args(source)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf_config(model_type="qwen2")))
    with pytest.raises(CheckpointError, match="'qwen2' model"):
        read_model_args(source)


def test_hf_pytorch_model_bin_of_a_tied_model(tmp_path):
    # Every name of a tied HF model starts with "model.": that prefix must not be taken for a wrapper's.
    source, held = write_hf_dir(tmp_path / "hf", random_state_dict(TIED), TIED, shards=1)
    st = source.checkpoint_dir / "model.safetensors"
    torch.save(load_file(st), source.checkpoint_dir / "pytorch_model.bin")
    st.unlink()
    assert_loads_exactly(source, held, TIED)


# --- tied embeddings ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_tied_embeddings_share_one_parameter(fmt, tmp_path):
    state = random_state_dict(TIED)
    if fmt in ("gguf", "meta"):
        state = {k: v for k, v in state.items() if k != "output.weight"}  # no output layer in the file
    source, held = write(fmt, tmp_path, state, TIED)
    held["output.weight"] = held["tok_embeddings.weight"]
    if fmt == "pth":  # torch.save of a tied model keeps both names, one storage
        assert set(torch.load(source.checkpoint_path)) >= {"output.weight", "tok_embeddings.weight"}
    assert_loads_exactly(source, held, TIED)
    model = load_model(source, TIED)
    assert model.output.weight is model.tok_embeddings.weight
    sd = load_state_dict(source, TIED)
    assert sd["output.weight"].data_ptr() == sd["tok_embeddings.weight"].data_ptr()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_load_model_on_cuda_keeps_the_tie(tmp_path):
    source, _ = write_gguf(tmp_path / "m.gguf", {k: v for k, v in random_state_dict(TIED).items()
                                                     if k != "output.weight"}, TIED)
    model = load_model(source, TIED, device="cuda")
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    assert model.output.weight is model.tok_embeddings.weight


def test_tied_model_with_its_own_output_layer_is_refused(tmp_path, state):
    source, _ = write_pth(tmp_path / "p" / "model.pth", state)  # untied: output differs from the embedding
    with pytest.raises(CheckpointError, match="output.weight that differs from the embedding"):
        load_state_dict(source, TIED)


def test_untied_model_without_output_layer_says_how_to_tie(tmp_path, state):
    source, _ = write_gguf(tmp_path / "m.gguf", {k: v for k, v in state.items() if k != "output.weight"})
    with pytest.raises(CheckpointError, match=r"lacks tensor output.weight .* tie_embeddings"):
        load_state_dict(source, TINY)


def test_tied_output_needs_the_embedding_even_when_only_output_is_kept(tmp_path, state):
    kept = {k: v for k, v in state.items() if k not in ("output.weight", "tok_embeddings.weight")}
    source, _ = write_pth(tmp_path / "p" / "model.pth", kept, params={})
    with pytest.raises(CheckpointError, match=r"lacks tensor tok_embeddings.weight \(expected shape \(96, 64\)\)"):
        load_state_dict(source, TIED, keep=lambda n: n == "output.weight")


# --- keep and transform --------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_keep_and_transform_see_one_full_tensor_at_a_time(fmt, tmp_path, state):
    source, held = write(fmt, tmp_path, state)
    expected = expected_shapes(TINY)
    seen = []

    def halve_rows(name, t):
        assert tuple(t.shape) == expected[name] and t.dtype == torch.bfloat16  # full, cast, before transform
        seen.append(name)
        return t[: t.shape[0] // 2].clone()

    sd = load_state_dict(source, TINY, keep=lambda n: n.startswith("layers.1."), transform=halve_rows,
                         dtype=torch.bfloat16)
    layer1 = [n for n in expected if n.startswith("layers.1.")]
    assert seen == layer1 and list(sd) == layer1
    for name, t in sd.items():
        torch.testing.assert_close(t, held[name].to(torch.bfloat16)[: expected[name][0] // 2], rtol=0, atol=0)


def test_keep_reads_only_the_kept_tensors(tmp_path, state, monkeypatch):
    source, _ = write_gguf(tmp_path / "m.gguf", state, TINY, QType.Q8_0)
    read = []
    dequantize = gguf_format._dequantize
    monkeypatch.setattr(gguf_format, "_dequantize", lambda t: read.append(t.name) or dequantize(t))
    load_state_dict(source, TINY, keep=lambda n: n.startswith("layers.1."))
    assert len(read) == 9 and all(name.startswith("blk.1.") for name in read)


def test_keep_only_output_of_a_tied_model_reads_the_embedding(tmp_path):
    state = random_state_dict(TIED)
    source, held = write_gguf(tmp_path / "m.gguf", {k: v for k, v in state.items() if k != "output.weight"}, TIED)
    sd = load_state_dict(source, TIED, keep=lambda n: n in ("output.weight", "norm.weight"))
    assert set(sd) == {"norm.weight", "output.weight"}
    torch.testing.assert_close(sd["output.weight"], held["tok_embeddings.weight"], rtol=0, atol=0)


# --- GGUF details --------------------------------------------------------------------------------------

def test_gguf_rope_freqs_give_llama3_scaling(tmp_path, state):
    scaled = TINY.with_(rope_scaling=RopeScaling(factor=8.0), rope_theta=500000.0)
    divisors = (rope_frequencies(scaled.with_(rope_scaling=None)) / rope_frequencies(scaled)).numpy()
    source, held = write_gguf(tmp_path / "m.gguf", state, scaled, extra={"rope_freqs.weight": (divisors, None)})
    assert divisors.max() == 8.0 and divisors.min() == 1.0  # the tiny model has all three bands
    assert read_model_args(source) == scaled
    assert_loads_exactly(source, held, scaled)
    with pytest.raises(CheckpointError, match="rope_freqs.weight is not Llama 3 RoPE scaling"):
        load_state_dict(source, scaled.with_(rope_scaling=None))


def test_gguf_metadata_of_another_architecture_is_refused(tmp_path, state):
    source, _ = write_gguf(tmp_path / "m.gguf", state, arch="qwen2")
    with pytest.raises(CheckpointError, match="holds a 'qwen2' model"):
        read_model_args(source)


def test_gguf_unsupported_quantization_is_named(tmp_path, state):
    q8_1 = np.zeros((TINY.dim, TINY.dim // 32 * 40), dtype=np.uint8)  # Q8_1: 40-byte blocks of 32
    source, _ = write_gguf(tmp_path / "m.gguf", state, extra={"blk.0.attn_q.bias": (q8_1, QType.Q8_1)})
    with pytest.raises(CheckpointError, match=r"blk.0.attn_q.bias .* type Q8_1, which gguf cannot dequantize"):
        load_state_dict(source, TINY)


# --- errors --------------------------------------------------------------------------------------------

def test_missing_files(tmp_path):
    cases = [(ModelSource("x", gguf_path=tmp_path / "no.gguf"), "GGUF file not found: .*no.gguf .*--gguf-path"),
             (ModelSource("x", checkpoint_path=tmp_path / "no.pth"), "not found: .*no.pth .*--checkpoint-path"),
             (ModelSource("x", checkpoint_dir=tmp_path / "no"), "directory not found: .*no .*--checkpoint-dir")]
    for source, message in cases:
        with pytest.raises(CheckpointError, match=message):
            read_model_args(source)
        with pytest.raises(CheckpointError, match=message):
            load_state_dict(source, TINY)


def test_unknown_formats(tmp_path, state):
    text = tmp_path / "notes.gguf"
    text.write_text("hello, I am not a model")
    with pytest.raises(CheckpointError, match="is not a GGUF file"):
        read_model_args(ModelSource("x", gguf_path=text))
    with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint"):
        load_state_dict(ModelSource("tiny", checkpoint_path=text), TINY)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither config.json .* nor params.json"):
        read_model_args(ModelSource("x", checkpoint_dir=tmp_path / "empty"))
    write_hf_dir(tmp_path / "hf", state, shards=1)
    with pytest.raises(CheckpointError, match="is a safetensors file: pass its directory"):
        read_model_args(ModelSource("x", checkpoint_path=tmp_path / "hf" / "model.safetensors"))
    a_gguf, _ = write_gguf(tmp_path / "renamed.bin", state)  # recognized by its content, not its name
    assert read_model_args(ModelSource("tiny", checkpoint_path=a_gguf.gguf_path)) == TINY


class NotATensor:
    pass


def test_pth_that_needs_unpickling_code_is_refused_but_legacy_format_loads(tmp_path, state):
    path = tmp_path / "p" / "model.pth"
    write_pth(path, {**state, "extra": NotATensor()})
    with pytest.raises(CheckpointError, match=r"torch.load\(weights_only=True\) refuses it: re-save it"):
        load_state_dict(ModelSource("tiny", checkpoint_path=path), TINY)
    torch.save(state, path, _use_new_zipfile_serialization=False)  # cannot be memory-mapped
    assert_loads_exactly(ModelSource("tiny", checkpoint_path=path), state)


def truncate(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("keep", [0.5, 0.01])
def test_truncated_files(fmt, keep, tmp_path, state):
    source, _ = write(fmt, tmp_path, state)
    victim = {"gguf": lambda: source.gguf_path,
              "hf": lambda: sorted(source.checkpoint_dir.glob("*.safetensors"))[-1],
              "meta": lambda: source.checkpoint_dir / "consolidated.01.pth",
              "pth": lambda: source.checkpoint_path}[fmt]()
    truncate(victim, keep)
    with pytest.raises(CheckpointError, match=r"truncated or corrupt .*: re-download or re-export it") as e:
        load_state_dict(source, TINY)
    assert str(victim) in str(e.value) and "\n" not in str(e.value)


def test_missing_tensor(tmp_path, state):
    source, _ = write_gguf(tmp_path / "m.gguf", {k: v for k, v in state.items()
                                                 if k != "layers.1.feed_forward.w3.weight"})
    with pytest.raises(CheckpointError, match=r"lacks tensor layers.1.feed_forward.w3.weight \(expected shape "
                                              r"\(160, 64\)\)"):
        load_state_dict(source, TINY)
    # A tensor that keep leaves out need not be there.
    sd = load_state_dict(source, TINY, keep=lambda n: n.startswith("layers.0."))
    assert len(sd) == 9


def test_unexpected_tensor(tmp_path, state):
    source, _ = write_pth(tmp_path / "p" / "model.pth", {**state, "layers.0.attention.wq.bias": torch.zeros(64)})
    with pytest.raises(CheckpointError, match=r"unexpected tensor layers.0.attention.wq.bias of shape \(64,\)"):
        load_state_dict(source, TINY)
    source, _ = write_hf_dir(tmp_path / "hf", state, shards=1)
    with pytest.raises(CheckpointError, match=r"unexpected tensor model.layers.1.\S+ .*\(and 8 more\)"):
        load_state_dict(source, TINY.with_(n_layers=1))


def test_wrong_shape_names_both_shapes(tmp_path, state):
    source, _ = write_gguf(tmp_path / "m.gguf", state)
    with pytest.raises(CheckpointError, match=r"tensor blk.0.ffn_gate.weight \(layers.0.feed_forward.w1.weight\) "
                                              r"in .* has shape \(160, 64\), expected \(192, 64\) \(and 5 more\)"):
        load_state_dict(source, TINY.with_(hidden_dim=192))


def test_errors_are_config_errors_of_one_line(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_model(ModelSource("x", gguf_path=tmp_path / "none.gguf"), TINY)
    assert isinstance(e.value, CheckpointError) and "\n" not in str(e.value)

