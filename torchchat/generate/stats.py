"""Timing and memory figures of one generation, printed on stderr."""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass

import torch


@dataclass
class GenerationStats:
    batch: int = 1
    prompt_tokens: int = 0  # per sequence, fed to the model (the prompt less what a cache row held)
    cached_tokens: int = 0  # prompt tokens a cache row already held (prefix reuse): not fed again
    new_tokens: int = 0  # per sequence, counting the first one (from prefill)
    ttft_s: float = 0.0  # time to first token: prefill plus its sampling
    decode_s: float = 0.0  # time for the tokens after the first
    # speculative decoding, summed over the sequences: verifications, draft tokens proposed and those the model agreed
    # with, tokens the verifications gave (a stop token among the kept drafts ends the sequence there)
    verifications: int = 0
    drafted: int = 0
    accepted: int = 0
    verified_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Draft tokens the target kept, over those proposed."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_verification(self) -> float:
        """Tokens a verification forward gave a sequence: the kept draft tokens and the target's own one."""
        return self.verified_tokens / self.verifications if self.verifications else 0.0

    @property
    def prefill_tok_s(self) -> float:
        return self.batch * self.prompt_tokens / self.ttft_s if self.ttft_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        """Tokens per second per sequence after the first token."""
        steps = self.new_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s else 0.0

    def summary(self, device: torch.device) -> str:
        cached = f" (+{self.cached_tokens} cached)" if self.cached_tokens else ""
        line = (f"time to first token {self.ttft_s:.3f} s | prefill {self.batch * self.prompt_tokens} tokens{cached} "
                f"{self.prefill_tok_s:.1f} tok/s | decode {self.new_tokens - 1} tokens {self.decode_tok_s:.2f} tok/s")
        if self.batch > 1:
            line += f" per sequence, {self.batch * self.decode_tok_s:.2f} tok/s over {self.batch} sequences"
        if self.verifications:
            line += (f" | speculation: {self.accepted}/{self.drafted} draft tokens accepted "
                     f"({100 * self.acceptance_rate:.0f}%), {self.tokens_per_verification:.2f} tokens per verification")
        return line + f" | peak memory {peak_memory_mb(device):.0f} MB"


def peak_memory_mb(device: torch.device) -> float:
    """Peak resident memory of this process (CPU), or peak allocated CUDA memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10
