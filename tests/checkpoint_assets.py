"""Writers of real checkpoint files for tests, each with the format's own writer.

Every writer takes a state dict in torchchat's (Meta's) names and layout, writes it the way the
format's own tools do (llama.cpp's GGUF names, Hugging Face's permuted q/k and shards, Meta's
model-parallel shards), and returns what the loader should be given (a ModelSource) together with
the state dict that the written file really holds (quantized and cast values).
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import save_file

from tests.assets import add_fields
from torchchat.catalog import ModelSource
from torchchat.model import ModelArgs, Transformer

TINY = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, hidden_dim=160, max_context=128)


def random_state_dict(args: ModelArgs = TINY, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fixed-seed model's weights; norms are randomized too, so that a misplaced norm shows."""
    torch.manual_seed(seed)
    model = Transformer(args)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, t in state.items():
        if name.endswith("norm.weight"):
            state[name] = 1 + 0.1 * torch.randn_like(t)
    if args.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    return state


def logits_of(model: Transformer, tokens: list[int]) -> torch.Tensor:
    """Logits for a prompt in one prefill, (T, vocab)."""
    model.setup_caches(1, 16)
    with torch.no_grad():
        return model(torch.tensor([tokens]), torch.arange(len(tokens)))[0]


def model_from(state: dict[str, torch.Tensor], args: ModelArgs = TINY) -> Transformer:
    model = Transformer(args)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()


# --- GGUF -------------------------------------------------------------------------------------------

GGUF_NAMES = {"attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
              "attention.wo": "attn_output", "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down",
              "feed_forward.w3": "ffn_up", "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}


def gguf_name(name: str) -> str:
    top = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
           "output.weight": "output.weight"}
    if name in top:
        return top[name]
    _, i, module = name.removesuffix(".weight").split(".", 2)
    return f"blk.{i}.{GGUF_NAMES[module]}.weight"


def write_gguf(path: Path, state: dict[str, torch.Tensor], args: ModelArgs = TINY,
               qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32, *, arch: str = "llama",
               extra: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType | None]] | None = None,
               qtypes: dict[str, gguf.GGMLQuantizationType] | None = None,
               vocab: dict | None = None) -> tuple[ModelSource, dict[str, torch.Tensor]]:
    """A llama GGUF as llama.cpp writes one: 2-D weights in ``qtype`` (or ``qtypes[name]``, by torchchat name),
    norms in F32. Returns the source and the tensors as the file holds them, dequantized.

    Leave 'output.weight' out of ``state`` for a tied model. ``extra``: GGUF name -> (raw data, its type).
    ``vocab``: the tokenizer.* metadata (a real vocabulary); without it, a placeholder token list.
    """
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(args.n_layers)
    writer.add_context_length(args.max_context)
    writer.add_embedding_length(args.dim)
    writer.add_feed_forward_length(args.hidden_dim)
    writer.add_head_count(args.n_heads)
    writer.add_head_count_kv(args.n_kv_heads)
    writer.add_rope_freq_base(args.rope_theta)
    writer.add_layer_norm_rms_eps(args.norm_eps)
    writer.add_rope_dimension_count(args.head_dim)
    if vocab is None:
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list([f"t{i}" for i in range(args.vocab_size)])
    else:
        add_fields(writer, vocab)
    held = {}
    for name, t in state.items():
        array = t.float().numpy()
        kind = (qtypes or {}).get(name, qtype) if array.ndim == 2 else gguf.GGMLQuantizationType.F32
        data = gguf.quants.quantize(array, kind)
        writer.add_tensor(gguf_name(name), data, raw_dtype=kind)
        held[name] = torch.from_numpy(gguf.quants.dequantize(data, kind).copy()).reshape(t.shape)
    for name, (data, kind) in (extra or {}).items():
        writer.add_tensor(name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return ModelSource("tiny", gguf_path=path), held


# --- Hugging Face -----------------------------------------------------------------------------------

HF_NAMES = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
            "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
            "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
            "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
            "ffn_norm": "post_attention_layernorm"}


def hf_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """transformers' convert_llama_weights_to_hf.py ``permute``: interleaved pairs -> halves."""
    rows, dim = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


def hf_config(args: ModelArgs = TINY, **changes) -> dict:
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.dim,
              "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
              "num_key_value_heads": args.n_kv_heads, "vocab_size": args.vocab_size,
              "intermediate_size": args.hidden_dim, "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
              "max_position_embeddings": args.max_context, "tie_word_embeddings": args.tie_embeddings,
              "hidden_act": "silu", "rope_scaling": None, "torch_dtype": "float32"}
    config.update(changes)
    return config


def write_hf_dir(path: Path, state: dict[str, torch.Tensor], args: ModelArgs = TINY, *, shards: int = 2,
                 dtype: torch.dtype = torch.float32) -> tuple[ModelSource, dict[str, torch.Tensor]]:
    """config.json and safetensors in Hugging Face's names and rotary layout; sharded with an index."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf_config(args)))
    hf, held = {}, {}
    for name, t in state.items():
        if args.tie_embeddings and name == "output.weight":
            continue  # safetensors refuses shared tensors; HF leaves lm_head out
        t = t.to(dtype)
        held[name] = t
        if name == "tok_embeddings.weight":
            hf["model.embed_tokens.weight"] = t
        elif name == "norm.weight":
            hf["model.norm.weight"] = t
        elif name == "output.weight":
            hf["lm_head.weight"] = t
        else:
            _, i, module = name.removesuffix(".weight").split(".", 2)
            heads = {"attention.wq": args.n_heads, "attention.wk": args.n_kv_heads}.get(module)
            hf[f"model.layers.{i}.{HF_NAMES[module]}.weight"] = hf_permute(t, heads) if heads else t
    if args.tie_embeddings:
        held["output.weight"] = held["tok_embeddings.weight"]
    names = list(hf)
    if shards == 1:
        save_file({k: hf[k].contiguous() for k in names}, path / "model.safetensors")
    else:
        weight_map = {}
        for s, chunk in enumerate(np.array_split(np.array(names), shards)):
            file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: hf[k].contiguous() for k in chunk}, path / file)
            weight_map.update({k: file for k in chunk})
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return ModelSource("tiny", checkpoint_dir=path), held


# --- Meta ---------------------------------------------------------------------------------------------

def meta_params(args: ModelArgs = TINY, **changes) -> dict:
    # multiple_of 32 and ffn_dim_multiplier 0.9 give TINY's hidden_dim: int(0.9 * int(2 * 256 / 3)) -> 160
    params = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
              "vocab_size": args.vocab_size, "multiple_of": 32, "ffn_dim_multiplier": 0.9,
              "norm_eps": args.norm_eps, "rope_theta": args.rope_theta, "max_seq_len": args.max_context}
    params.update(changes)
    return params


def write_meta_dir(path: Path, state: dict[str, torch.Tensor], args: ModelArgs = TINY, *, shards: int = 2,
                   embedding_dim: int = 1, dtype: torch.dtype = torch.bfloat16,
                   **params) -> tuple[ModelSource, dict[str, torch.Tensor]]:
    """params.json and consolidated.NN.pth split as Meta's model parallelism splits them.

    embedding_dim: 1 as in Llama 2 (each shard holds every token), 0 as in Llama 3.
    """
    path.mkdir(parents=True, exist_ok=True)
    (path / "params.json").write_text(json.dumps(meta_params(args, **params)))
    held = {name: t.to(dtype) for name, t in state.items()}
    parts = [{"rope.freqs": torch.ones(args.head_dim // 2)} for _ in range(shards)]  # as Llama 1/2 saved it
    for name, t in held.items():
        if t.dim() == 1:
            pieces = [t] * shards  # norms are replicated
        elif name == "tok_embeddings.weight":
            pieces = t.chunk(shards, embedding_dim)
        elif name.endswith(("wo.weight", "w2.weight")):
            pieces = t.chunk(shards, 1)
        else:
            pieces = t.chunk(shards, 0)
        for part, piece in zip(parts, pieces):
            part[name] = piece.clone()  # a view would save the whole storage into every shard
    for s, part in enumerate(parts):
        torch.save(part, path / f"consolidated.{s:02d}.pth")
    return ModelSource("tiny", checkpoint_dir=path), held


# --- plain .pth ----------------------------------------------------------------------------------------

def write_pth(path: Path, state: dict[str, torch.Tensor], args: ModelArgs = TINY, *, params: dict | None = None,
              gpt_fast: bool = False, name: str = "tiny") -> tuple[ModelSource, dict[str, torch.Tensor]]:
    """torch.save of a state dict, with a params.json beside it unless params is {}.

    gpt_fast: wq/wk/wv fused into wqkv and the dict wrapped in {"model": ...}, as gpt-fast saves.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = dict(state)
    if gpt_fast:
        for i in range(args.n_layers):
            p = f"layers.{i}.attention."
            saved[p + "wqkv.weight"] = torch.cat([saved.pop(p + w) for w in ("wq.weight", "wk.weight", "wv.weight")])
        saved = {"model": saved}
    torch.save(saved, path)
    params = meta_params(args) if params is None else params
    if params:
        (path.parent / "params.json").write_text(json.dumps(params))
    return ModelSource(name, checkpoint_path=path), dict(state)
