"""What one benchmark subprocess runs (Case, Workload) and what it reports (Result).

All three cross the process boundary as JSON (``dataclasses.asdict`` one way, ``**`` the other).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Case:
    """One subprocess: an engine, a model and a setting."""

    engine: str  # "torchchat", "transformers" or "llama.cpp"
    model: str
    dtype: str  # activations and unquantized weights: "fp32" or "bf16"; "native": a GGUF's own quantization
    quantize: str | None = None  # torchchat: "int8" or "int4" weight-only
    compile: bool = False  # torchchat: torch.compile the decode step
    gguf: str | None = None  # llama.cpp: the file it runs on (dtype is then its tensor type, e.g. "Q4_1")
    draft: str | None = None  # torchchat, speculative decoding: "int4" (the model's own weights) or "lookup"
    prompt: str = "passage"  # SmolLM2: "passage" (the passage repeated) or "summary" (a chat asking to summarize it)

    @property
    def setting(self) -> str:
        parts = [self.dtype] + ([self.quantize] if self.quantize else []) + (["compile"] if self.compile else [])
        parts += [f"+draft {self.draft}"] if self.draft else []
        parts += [self.prompt] if self.prompt != "passage" else []
        return " ".join(parts)


@dataclass
class Workload:
    prompt_tokens: int = 512
    new_tokens: int = 128
    runs: int = 3
    threads: int = 2
    bandwidth_gbs: float = 33.0
    llama_cpp: str | None = None  # llama-bench's path
    busy: int = 0  # CPU hogs running beside the engine for the whole subprocess (bench.py --busy)


@dataclass
class Result:
    engine: str
    model: str
    dtype: str
    setting: str
    ttft_s: float = 0.0
    prefill_tok_s: float = 0.0
    decode_tok_s: float = 0.0
    peak_rss_mb: float = 0.0
    load_s: float = 0.0
    warmup_s: float = 0.0  # the first (short) generation, compilation included
    weight_mb: float = 0.0
    ceiling_tok_s: float = 0.0  # decode bound: weight bytes per token / bandwidth
    threads: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    runs: list = field(default_factory=list)  # per run: [ttft_s, prefill_tok_s, decode_tok_s]
    tokens: list = field(default_factory=list)  # greedy tokens of the first run
    busy: int = 0  # CPU hogs that ran beside it
    note: str = ""
