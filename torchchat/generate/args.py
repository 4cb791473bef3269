"""How to generate (``GenerationArgs``, one per request, validated at construction) and the checks every
backend applies to a request before it runs."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torchchat.errors import ConfigError, ContextFull


SEED_LIMIT = 2**64  # seeds are in [0, 2**64): what torch.Generator.manual_seed takes, unsigned
# Each sample is one more row of the KV cache and of every activation: 64 rows of a 2048-token cache are
# 3 GB for SmolLM2-135M, 17 GB for Llama 3.1 8B (float16 caches); more would exhaust memory mid-request.
MAX_NUM_SAMPLES = 64
MAX_STOP_STRINGS = 4  # as OpenAI allows
MAX_STOP_CHARS = 1000  # per stop string: each generated token is checked against this much recent text


@dataclass
class GenerationArgs:
    """How to generate: validated at construction, one per request."""

    max_new_tokens: int = 200
    temperature: float = 0.8  # 0: greedy
    top_k: int | None = 200  # None: no top-k filter
    top_p: float = 1.0  # 1.0: no nucleus filter
    seed: int | None = None  # None: a random seed
    num_samples: int = 1  # sequences generated at once from the same prompt
    stop: tuple[str, ...] = ()  # text that ends a sequence (checked on every process: all stop alike)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens ({self.max_new_tokens}) must be at least 1")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ConfigError(f"--temperature ({self.temperature}) must be >= 0 and finite (0 is greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"--top-k ({self.top_k}) must be at least 1")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p ({self.top_p}) must be in (0, 1]")
        if self.num_samples < 1:
            raise ConfigError(f"--num-samples ({self.num_samples}) must be at least 1")
        if self.num_samples > MAX_NUM_SAMPLES:
            raise ConfigError(f"--num-samples ({self.num_samples}) must be at most {MAX_NUM_SAMPLES}: each sample is "
                              f"a row of the KV cache and of every activation")
        if self.seed is not None and not 0 <= self.seed < SEED_LIMIT:
            raise ConfigError(f"--seed ({self.seed}) must be in [0, 2**64)")
        self.stop = tuple(self.stop)
        check_stop_strings(self.stop)


def check_stop_strings(stop: tuple[str, ...]):
    """At most MAX_STOP_STRINGS non-empty strings of at most MAX_STOP_CHARS characters (ConfigError)."""
    if len(stop) > MAX_STOP_STRINGS:
        raise ConfigError(f"at most {MAX_STOP_STRINGS} stop strings (got {len(stop)})")
    for s in stop:
        if not s:
            raise ConfigError("a stop string must not be empty")
        if len(s) > MAX_STOP_CHARS:
            raise ConfigError(f"a stop string has {len(s)} characters; at most {MAX_STOP_CHARS} are allowed")


def encode_prompt(tokenizer, text: str) -> list[int]:
    """A raw prompt (no chat template) -> its tokens, with BOS where the tokenizer wants one; ConfigError if none."""
    tokens = tokenizer.encode(text, bos=tokenizer.add_bos)
    if not tokens:
        raise ConfigError("the prompt is empty; pass --prompt TEXT or text on standard input")
    return tokens


def check_fits(prompt_tokens: int, max_new_tokens: int, context: int, start_pos: int = 0):
    """ContextFull unless a prompt of ``prompt_tokens`` at ``start_pos`` plus ``max_new_tokens`` fit in ``context``."""
    if start_pos + prompt_tokens + max_new_tokens > context:
        at = f" at position {start_pos}" if start_pos else ""
        raise ContextFull(f"prompt ({prompt_tokens} tokens{at}) plus --max-new-tokens ({max_new_tokens}) exceeds the "
                          f"context ({context}); shorten the prompt or lower --max-new-tokens")
