"""The Hugging Face transformers engine: LlamaForCausalLM with our weights, renamed to its names."""

from __future__ import annotations

import time

from benchlib.cases import Case, Result, Workload
from benchlib.measure import measure, new_result
from benchlib.weights import load_weights, prompt_ids


def to_hf_state_dict(state: dict, args) -> dict:
    """torchchat names and Meta's interleaved rotary rows -> transformers' LlamaForCausalLM."""
    top = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    layer = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
             "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
             "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
             "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm"}
    heads = {"attention.wq": args.n_heads, "attention.wk": args.n_kv_heads}
    out = {}
    for name, t in state.items():
        if name in top:
            out[top[name]] = t  # tied: lm_head.weight is the embedding's tensor, and stays so with assign=True
            continue
        parts = name.split(".")  # layers.{i}.{module...}.weight
        i, module, what = parts[1], ".".join(parts[2:-1]), parts[-1]
        t = _to_half_split(t, heads[module]) if module in heads else t
        out[f"model.layers.{i}.{layer[module]}.{what}"] = t
    return out


def _to_half_split(w, n_heads: int):
    """Meta's interleaved rotary pairs -> Hugging Face's half-split rows (HF's ``permute``)."""
    rows, dim = w.shape
    w = w.reshape(n_heads, rows // n_heads // 2, 2, dim)  # (heads, head_dim // 2, pair, dim)
    return w.transpose(1, 2).reshape(rows, dim)  # (heads * head_dim, dim): first halves, then second halves


def hf_config(args, dtype):
    from transformers import LlamaConfig

    rope = {"rope_type": "default", "rope_theta": args.rope_theta}
    if args.rope_scaling is not None:
        s = args.rope_scaling
        rope.update(rope_type="llama3", factor=s.factor, low_freq_factor=s.low_freq_factor,
                    high_freq_factor=s.high_freq_factor, original_max_position_embeddings=s.original_max_position)
    return LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.hidden_dim,
                       num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                       num_key_value_heads=args.n_kv_heads, head_dim=args.head_dim, rms_norm_eps=args.norm_eps,
                       max_position_embeddings=args.max_context, tie_word_embeddings=args.tie_embeddings,
                       rope_parameters=rope, bos_token_id=None, eos_token_id=None, pad_token_id=0, dtype=dtype)


def load_transformers(model: str, dtype):
    """(ModelArgs, LlamaForCausalLM) with this model's weights in ``dtype``: torchchat's, renamed."""
    import torch
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    args, ours = load_weights(model, dtype)
    state = to_hf_state_dict(ours.state_dict(), args)
    del ours
    with torch.device("meta"):
        hf = LlamaForCausalLM(hf_config(args, dtype))
    hf.load_state_dict(state, strict=True, assign=True)
    del state
    hf.model.rotary_emb = LlamaRotaryEmbedding(hf.config)  # its buffers were made on the meta device
    return args, hf.eval().requires_grad_(False)


def run_transformers(case: Case, w: Workload) -> Result:
    import torch
    from transformers import GenerationConfig
    from transformers.generation.streamers import BaseStreamer

    from torchchat.generate.local import DTYPES

    t0 = time.perf_counter()
    args, hf = load_transformers(case.model, DTYPES[case.dtype])
    result = new_result(case, w, hf, load_s=time.perf_counter() - t0)
    prompt = torch.tensor([prompt_ids(case.model, w.prompt_tokens, args.vocab_size)])

    class Clock(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):  # called with the prompt, then with each new token
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def generate(n: int):
        clock = Clock()
        config = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                                  pad_token_id=0, bos_token_id=None)
        start = time.perf_counter()
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config,
                          streamer=clock)  # generate runs under no_grad
        first = clock.times[1]
        return out[0, prompt.size(1):].tolist(), first - start, clock.times[-1] - first

    return measure(result, w, generate)
