"""LocalGenerator: the whole model in this process, on CPU or CUDA."""

from __future__ import annotations

import time
from typing import Iterator

import torch

from torchchat.generate.base import Generator
from torchchat.model import Transformer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class LocalGenerator(Generator):
    """One process. ``compile=True`` compiles the one-token decode step (static shapes)."""

    def __init__(self, model: Transformer, tokenizer, chat_format, *, max_seq_len: int, max_batch: int = 1,
                 compile: bool = False, **kwargs):
        device = next(model.parameters()).device
        super().__init__(model.args, tokenizer, chat_format, max_seq_len=max_seq_len, device=device, **kwargs)
        self.model = model
        self.max_batch = max_batch
        model.setup_caches(max_batch, max_seq_len)
        self._decode_step = self._forward_one
        if compile:
            self._decode_step = torch.compile(self._forward_one, fullgraph=True, dynamic=False)

    @classmethod
    def from_source(cls, source, tokenizer, chat_format, *, max_seq_len: int, max_batch: int = 1,
                    dtype: str = "fp32", device: str = "cpu", compile: bool = False, quantize: str | None = None,
                    **kwargs) -> "LocalGenerator":
        """Load the weights of ``source`` and build a generator; reports the load time on stderr."""
        from torchchat.checkpoint import load_model, read_model_args

        t0 = time.perf_counter()
        model = load_model(source, read_model_args(source), dtype=DTYPES[dtype], device=device)
        if quantize:
            from torchchat.quantize import quantize_model
            quantize_model(model, quantize)
        gen = cls(model, tokenizer, chat_format, max_seq_len=max_seq_len, max_batch=max_batch, compile=compile,
                  **kwargs)
        gen.report(f"loaded {source.name} ({dtype}, {device}) in {time.perf_counter() - t0:.2f} s")
        return gen

    def prefill(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        self._check_batch(tokens.size(0))
        input_pos = torch.arange(start_pos, start_pos + tokens.size(1), device=self.device)
        with torch.no_grad():
            logits = self.model(tokens, input_pos)  # (B, T, V)
        return self.sample(logits[:, -1])

    def decode_n_tokens(self, token: torch.Tensor, start_pos: int, n: int) -> Iterator[torch.Tensor]:
        for pos in range(start_pos, start_pos + n):
            input_pos = torch.tensor([pos], device=self.device)
            with torch.no_grad():
                logits = self._decode_step(token.view(-1, 1), input_pos)  # (B, V)
            token = self.sample(logits)
            yield token

    def _forward_one(self, token: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return self.model(token, input_pos)[:, -1]  # (B, V)

    def _check_batch(self, batch: int):
        if batch > self.max_batch:
            self.max_batch = batch
            self.model.setup_caches(batch, self.max_seq_len)
