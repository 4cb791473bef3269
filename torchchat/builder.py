"""The application layer: the CLI's flags -> model source, tokenizer, chat format and a generator.

Between the CLI (and the launcher, and the server command) and the library: it resolves the model
source, checks it against its tokenizer before any weight is loaded, and builds the generator,
local or distributed; this is the only place that chooses which.

No torch import at module level: the CLI imports this module for `--help`.
"""

from __future__ import annotations

from torchchat.errors import ConfigError

DEFAULT_CHAT_SEQ_LEN = 2048
DEFAULT_MAX_BATCH = 8  # the server's sequences at once (--max-batch); see its help in cli.py


def generation_args(args, num_samples: int = 1):
    from torchchat.generate.base import GenerationArgs

    return GenerationArgs(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed, num_samples)


def resolve_source(args):
    from torchchat.catalog import DEFAULT_MODEL_DIR, resolve_model

    return resolve_model(args.model, checkpoint_path=args.checkpoint_path, gguf_path=args.gguf_path,
                         checkpoint_dir=args.checkpoint_dir, tokenizer_path=args.tokenizer_path,
                         model_dir=args.model_directory or DEFAULT_MODEL_DIR)


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA device is available; use --device cpu")
    return name


class Prepared:
    """Everything checked before any weight is loaded: model files, shapes, tokenizer, sizes."""

    def __init__(self, args):
        from torchchat.chat_format import chat_format_for
        from torchchat.checkpoint import read_model_args, weight_types
        from torchchat.tokenizer import load_tokenizer

        self.source = resolve_source(args)
        self.model_args = read_model_args(self.source)
        self.tokenizer = load_tokenizer(self.source)
        if self.tokenizer.vocab_size > self.model_args.vocab_size:
            raise ConfigError(f"the tokenizer has {self.tokenizer.vocab_size} tokens but the model only "
                              f"{self.model_args.vocab_size}: they do not belong together (check --tokenizer-path)")
        self.chat_format = chat_format_for(self.tokenizer, self.source)
        self.device = resolve_device(args.device)
        self.weight_types = weight_types(self.source)  # a GGUF's matrices by type: what it runs as by default

    def max_seq_len(self, args, needed: int) -> int:
        length = args.max_seq_length or min(needed, self.model_args.max_context)
        if length > self.model_args.max_context:
            raise ConfigError(f"--max-seq-length ({length}) exceeds the model's context "
                              f"({self.model_args.max_context})")
        if length < 2:
            raise ConfigError(f"--max-seq-length ({length}) must be at least 2")
        return length


def weights_dtype(args, prep: Prepared, *, one_process: bool = True) -> tuple[str, bool]:
    """(dtype, keep_quantized): how the weights run. ``--dtype`` given: that dtype, everything dequantized. Else the
    file's own: a GGUF whose matrices are (partly) quantized keeps them quantized, as llama.cpp runs it (one process
    on CPU: the quantized layers are CPU kernels; elsewhere it is dequantized to fp32), with fp32 for the rest; a
    BF16 GGUF runs in bf16; anything else in fp32."""
    from torchchat.checkpoint import kept_quantized

    if args.dtype is not None:
        return args.dtype, False
    types = prep.weight_types
    if any(kept_quantized(t) for t in types):
        return "fp32", one_process and prep.device == "cpu"
    return _float_dtype(types), False


def describe_weights(types: dict[str, int]) -> str:
    """What a file's weights run as by default, for `list`: "int4 (Q4_1 x210), int8 (Q8_0 x1)", "bf16", "fp32"."""
    from torchchat.checkpoint import kept_quantized

    if not any(kept_quantized(t) for t in types):
        return _float_dtype(types)
    return ", ".join(f"{kept_quantized(t) or 'fp32'} ({t} x{n})" for t, n in types.items())


def _float_dtype(types: dict[str, int]) -> str:
    """The dtype a file without quantized matrices runs in by default: bf16 for a BF16 GGUF, else fp32."""
    return "bf16" if types and set(types) == {"BF16"} else "fp32"


def schedule_options(args) -> dict:
    """The Generator's scheduling keywords from the flags: ``prefix_reuse=False`` under ``--no-prefix-reuse``
    (a server flag; the other commands have no such attribute and keep the generator's default)."""
    return {"prefix_reuse": False} if getattr(args, "no_prefix_reuse", False) else {}


def build_generator(args, prep: Prepared, max_seq_len: int, max_batch: int = 1):
    """This process alone: a LocalGenerator."""
    from torchchat.generate.local import LocalGenerator

    dtype, keep_quantized = weights_dtype(args, prep)
    return LocalGenerator.from_source(prep.source, prep.tokenizer, prep.chat_format, max_seq_len=max_seq_len,
                                      max_batch=max_batch, dtype=dtype, keep_quantized=keep_quantized,
                                      device=prep.device, compile=args.compile, quantize=args.quantize,
                                      model_args=prep.model_args, **schedule_options(args))


def build_distributed_generator(args, prep: Prepared, dims, device: str, max_seq_len: int, max_batch: int = 1):
    """One rank of a job (``dims``: its ParallelDims) in a process group already joined: a DistributedGenerator."""
    from torchchat.generate.distributed import DistributedGenerator

    return DistributedGenerator.from_source(prep.source, prep.tokenizer, prep.chat_format, dims,
                                            max_seq_len=max_seq_len, max_batch=max_batch,
                                            dtype=weights_dtype(args, prep, one_process=False)[0],
                                            device=device, model_args=prep.model_args, **schedule_options(args))
