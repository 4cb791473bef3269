"""The application layer: the CLI's flags -> model source, tokenizer, chat format and a generator.

Between the CLI (and the launcher, and the server command) and the library: it resolves the model
source, checks it against its tokenizer before any weight is loaded, and builds the generator,
local or distributed; this is the only place that chooses which.

No torch import at module level: the CLI imports this module for `--help`.
"""

from __future__ import annotations

from dataclasses import dataclass

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
        self.speculation = plan_speculation(args, self)  # None: plain decoding

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


# Draft tokens a verification checks by default: SmolLM2 fp32 with its int4 self-draft keeps ~85% of them, so
# a verification gives ~3.5 tokens at k = 4 and the draft's k forwards still cost less than the verification.
DEFAULT_SPECULATE_K = 4


@dataclass(frozen=True)
class SpeculationPlan:
    """How to draft (the speculation flags, checked before any weight loads): ``mode`` "lookup" (prompt lookup of
    ``ngram`` tokens), "model" (the model at ``source``, ``quantize``d if set) or "self" (the target's own weights,
    ``quantize``d)."""

    mode: str
    k: int
    ngram: int = 0
    source: object = None  # the draft's ModelSource ("model")
    quantize: str | None = None

    def __post_init__(self):
        if self.mode not in ("lookup", "model", "self"):
            raise ValueError(f"unknown drafting mode {self.mode!r}")
        if self.k < 1:
            raise ConfigError(f"--speculate-k ({self.k}) must be at least 1")

    def describe(self) -> str:
        if self.mode == "lookup":
            return f"prompt lookup ({self.ngram}-grams), k {self.k}"
        what = "the model's own weights" if self.mode == "self" else self.source.name
        return f"draft {what}" + (f" in {self.quantize}" if self.quantize else "") + f", k {self.k}"


def plan_speculation(args, prep) -> SpeculationPlan | None:
    """The speculation flags -> a SpeculationPlan, or None without them; ConfigError for a bad combination or a
    draft whose vocabulary is not the model's (its files are read here, its weights are not)."""
    lookup = getattr(args, "prompt_lookup", None)
    draft_flags = {flag: getattr(args, attr, None) for flag, attr in (
        ("--draft-model", "draft_model"), ("--draft-checkpoint-path", "draft_checkpoint_path"),
        ("--draft-gguf-path", "draft_gguf_path"))}
    drafts = [flag for flag, value in draft_flags.items() if value is not None]
    quantize = getattr(args, "draft_quantize", None)
    k = getattr(args, "speculate_k", None)
    if lookup is None and not drafts and quantize is None:
        if k is not None:
            raise ConfigError("--speculate-k needs a drafter: --draft-model/--draft-checkpoint-path/--draft-gguf-path, "
                              "--draft-quantize int4 (the model's own weights as the draft) or --prompt-lookup N")
        return None
    k = DEFAULT_SPECULATE_K if k is None else k
    if len(drafts) > 1:
        raise ConfigError(f"give one draft model, not {' and '.join(drafts)}")
    if lookup is not None:
        if drafts or quantize is not None:
            raise ConfigError(f"--prompt-lookup drafts without a model: drop {(drafts or ['--draft-quantize'])[0]}, "
                              f"or drop --prompt-lookup to draft with a model")
        if lookup < 1:
            raise ConfigError(f"--prompt-lookup ({lookup}) must be at least 1 (the longest n-gram matched)")
        return SpeculationPlan("lookup", k, ngram=lookup)
    if not drafts:
        return SpeculationPlan("self", k, quantize=quantize)
    source = _draft_source(args)
    _check_draft_vocabulary(source, prep)
    return SpeculationPlan("model", k, source=source, quantize=quantize)


def _draft_source(args):
    from torchchat.catalog import DEFAULT_MODEL_DIR, resolve_model

    try:
        return resolve_model(args.draft_model, checkpoint_path=args.draft_checkpoint_path,
                             gguf_path=args.draft_gguf_path, tokenizer_path=args.tokenizer_path,
                             model_dir=args.model_directory or DEFAULT_MODEL_DIR)
    except ConfigError as e:
        raise ConfigError(f"the draft model: {e}".replace("--checkpoint-path", "--draft-checkpoint-path")
                          .replace("--gguf-path", "--draft-gguf-path")) from None


def _check_draft_vocabulary(source, prep):
    """ConfigError unless the draft has the model's vocabulary: the same number of logits, the same ids for
    the same text."""
    from torchchat.checkpoint import read_model_args
    from torchchat.tokenizer import load_tokenizer

    draft_args = read_model_args(source)
    if draft_args.vocab_size != prep.model_args.vocab_size:
        raise ConfigError(f"the draft {source.name} has a vocabulary of {draft_args.vocab_size} tokens and "
                          f"{prep.source.name} of {prep.model_args.vocab_size}: a draft must share the model's "
                          f"tokenizer (pick one of the same family)")
    probe = "Speculative decoding: 123 tokens, naïve café ✓"
    tokenizer = load_tokenizer(source)
    if tokenizer.encode(probe) != prep.tokenizer.encode(probe) or tokenizer.stop_ids != prep.tokenizer.stop_ids:
        raise ConfigError(f"the draft {source.name} tokenizes text differently from {prep.source.name}: a draft must "
                          f"share the model's tokenizer (pick one of the same family)")


def build_drafter(args, prep: Prepared, max_seq_len: int, max_batch: int, device: str | None = None):
    """The drafter of ``prep.speculation`` (None without one); a draft model loads here, on this process (on
    ``device``, default the model's)."""
    from torchchat.generate.speculative import ModelDrafter, PromptLookupDrafter, check_speculate_k

    plan = prep.speculation
    if plan is None:
        return None
    check_speculate_k(plan.k, max_seq_len)  # before the draft's weights load
    if plan.mode == "lookup":
        return PromptLookupDrafter(plan.k, plan.ngram)
    from torchchat.generate.local import LocalGenerator

    source = prep.source if plan.mode == "self" else plan.source
    draft = LocalGenerator.from_source(source, prep.tokenizer, prep.chat_format, max_seq_len=max_seq_len,
                                       max_batch=max_batch, dtype="fp32", device=device or prep.device,
                                       quantize=plan.quantize)
    return ModelDrafter(plan.k, draft)


def build_generator(args, prep: Prepared, max_seq_len: int, max_batch: int = 1):
    """This process alone: a LocalGenerator (with its drafter, if speculating)."""
    from torchchat.generate.local import LocalGenerator

    dtype, keep_quantized = weights_dtype(args, prep)
    drafter = build_drafter(args, prep, max_seq_len, max_batch)
    gen = LocalGenerator.from_source(prep.source, prep.tokenizer, prep.chat_format, max_seq_len=max_seq_len,
                                     max_batch=max_batch, dtype=dtype, keep_quantized=keep_quantized,
                                     device=prep.device, compile=args.compile, quantize=args.quantize,
                                     model_args=prep.model_args, drafter=drafter, **schedule_options(args))
    if prep.speculation is not None:
        gen.report(f"speculative decoding: {prep.speculation.describe()}")
    return gen


def build_distributed_generator(args, prep: Prepared, dims, device: str, max_seq_len: int, max_batch: int = 1):
    """One rank of a job (``dims``: its ParallelDims) in a process group already joined: a DistributedGenerator."""
    from torchchat.generate.distributed import DistributedGenerator

    speculation = {}
    if prep.speculation is not None:  # the draft on rank 0, beside the scheduler; every rank sizes plans for k
        from torchchat.generate.speculative import check_speculate_k

        check_speculate_k(prep.speculation.k, max_seq_len)
        speculation = {"speculate_k": prep.speculation.k,
                       "make_drafter": lambda: build_drafter(args, prep, max_seq_len, max_batch, device=str(device))}
    gen = DistributedGenerator.from_source(prep.source, prep.tokenizer, prep.chat_format, dims,
                                           max_seq_len=max_seq_len, max_batch=max_batch,
                                           dtype=weights_dtype(args, prep, one_process=False)[0],
                                           device=device, model_args=prep.model_args, **speculation,
                                           **schedule_options(args))
    if prep.speculation is not None:
        gen.report(f"speculative decoding: {prep.speculation.describe()}")
    return gen
