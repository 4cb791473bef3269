"""Hugging Face directories: config.json and safetensors (or pytorch_model*.bin) weights, maybe sharded.

Hugging Face stores q_proj and k_proj with each head's rotary pairs split into two halves (the
``permute`` of transformers' convert_llama_weights_to_hf.py); torchchat's model rotates interleaved
pairs as Meta's does, so those two weights are permuted back here.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from torchchat.checkpoints.common import (
    CheckpointError, LazyTensor, checked_args, corrupt_error, default_context, read_json, require_file,
    state_dict_of, torch_load,
)
from torchchat.model import ModelArgs, RopeScaling

_TOP = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
        "lm_head.weight": "output.weight"}
_LAYER = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
          "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
          "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2", "mlp.up_proj": "feed_forward.w3",
          "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")
_ROTARY_BUFFER = "rotary_emb.inv_freq"  # saved by old transformers versions; recomputed


def is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def model_args(path: Path, name: str) -> ModelArgs:
    config_path = path / "config.json"
    cfg = read_json(config_path)

    def need(key):
        if key not in cfg:
            raise CheckpointError(f"{config_path} lacks '{key}': re-download the model's config.json")
        return cfg[key]

    model_type = cfg.get("model_type", "llama")
    if model_type != "llama":
        raise CheckpointError(f"{config_path} describes a '{model_type}' model: torchchat runs llama models only")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise CheckpointError(f"{config_path} sets {flag}: torchchat's llama model has no biases")
    if cfg.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{config_path}: hidden_act '{cfg['hidden_act']}' is not supported (only silu)")
    dim, n_heads = need("hidden_size"), need("num_attention_heads")
    if cfg.get("head_dim") not in (None, dim // n_heads):
        raise CheckpointError(f"{config_path}: head_dim ({cfg['head_dim']}) differs from hidden_size / "
                              f"num_attention_heads ({dim // n_heads}), which torchchat's model does not support")
    return checked_args(
        config_path,
        dim=dim,
        n_layers=need("num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        vocab_size=need("vocab_size"),
        hidden_dim=need("intermediate_size"),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),  # transformers' LlamaConfig defaults
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        rope_scaling=_rope_scaling(config_path, cfg.get("rope_scaling")),
        max_context=cfg.get("max_position_embeddings") or default_context(name),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


def _rope_scaling(config_path: Path, rs: dict | None) -> RopeScaling | None:
    if not rs:
        return None
    kind = rs.get("rope_type", rs.get("type"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise CheckpointError(f"{config_path}: rope_scaling type '{kind}' is not supported (only llama3)")
    try:
        return RopeScaling(factor=float(rs["factor"]), low_freq_factor=float(rs["low_freq_factor"]),
                           high_freq_factor=float(rs["high_freq_factor"]),
                           original_max_position=int(rs["original_max_position_embeddings"]))
    except KeyError as e:
        raise CheckpointError(f"{config_path}: rope_scaling lacks {e}: re-download the config") from e


def tensors(path: Path, args: ModelArgs) -> dict[str, LazyTensor]:
    """Every weight of the directory under torchchat's name; q/k are permuted to Meta's layout on load."""
    heads = {"attention.wq": args.n_heads, "attention.wk": args.n_kv_heads}
    out = {}
    for file_name, shape, read in _file_tensors(path):
        if file_name.endswith(_ROTARY_BUFFER):
            continue
        name, n_heads = file_name, None
        if file_name in _TOP:
            name = _TOP[file_name]
        elif (m := _LAYER_RE.fullmatch(file_name)) and m.group(2) in _LAYER:
            module = _LAYER[m.group(2)]
            name, n_heads = f"layers.{m.group(1)}.{module}.weight", heads.get(module)
        load = functools.partial(_unpermute_loaded, read, n_heads) if n_heads else read
        out[name] = LazyTensor(file_name, shape, load)
    return out


def _unpermute_loaded(read, n_heads: int) -> torch.Tensor:
    return unpermute(read(), n_heads)


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Hugging Face's half-split rotary rows -> Meta's interleaved pairs (inverse of HF's ``permute``)."""
    rows, dim = w.shape
    head_dim = rows // n_heads
    w = w.reshape(n_heads, 2, head_dim // 2, dim)  # (heads, [first half, second half], head_dim // 2, dim)
    return w.transpose(1, 2).reshape(rows, dim)  # (heads * head_dim, dim): pairs (x_i, x_{i + head_dim/2})


def _file_tensors(path: Path):
    """(name in file, shape, loader) for every tensor of every weight file, reading no tensor data."""
    files = _weight_files(path)
    for file in files:
        if file.suffix == ".safetensors":
            yield from _safetensors(file)
        else:
            for name, t in state_dict_of(file, torch_load(file), strip_prefixes=False).items():
                yield name, tuple(t.shape), lambda t=t: t  # already memory-mapped


def _safetensors(file: Path):
    try:
        handle = safe_open(str(file), framework="pt")
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError) as e:
        raise corrupt_error(file, e) from e
    for key, shape in shapes.items():
        yield key, shape, functools.partial(handle.get_tensor, key)


def _weight_files(path: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index} has no weight_map: re-download it")
            return [require_file(path / f, "shard", f"listed in {index.name}; re-download the model")
                    for f in sorted(set(weight_map.values()))]
    for pattern in ("model*.safetensors", "pytorch_model*.bin"):
        files = sorted(path.glob(pattern))
        if files:
            return files
    raise CheckpointError(f"{path} has config.json but no weights (model.safetensors, its .index.json, or "
                          f"pytorch_model.bin): download them into that directory")
