"""LocalGenerator: the whole model in this process, on CPU or CUDA."""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

import torch

from torchchat import cpu
from torchchat.generate.base import Generator
from torchchat.model import Transformer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Inductor options for the compiled decode step. Speed, per token (SmolLM2 int4 on CPU, ~1 ms of ~15 in
# an A/B): no size/stride checks on every extern op's output (debug checks; the compiled tokens are
# tested against eager ones), and no OpenMP region for loops under 4096 elements (a decode step's norms,
# rotary and SwiGLU products are 576-8192 values: waking a thread costs more than it saves).
COMPILE_OPTIONS = {"size_asserts": False, "alignment_asserts": False, "scalar_asserts": False,
                   "cpp.min_chunk_size": 4096}


class LocalGenerator(Generator):
    """One process. ``compile=True`` compiles the one-token decode step (static shapes)."""

    def __init__(self, model: Transformer, tokenizer, chat_format, *, max_seq_len: int, max_batch: int = 1,
                 compile: bool = False, **kwargs):
        device = next(model.parameters()).device
        super().__init__(model.args, tokenizer, chat_format, max_seq_len=max_seq_len, device=device, **kwargs)
        self.model = model
        self.max_batch = max_batch
        # Speed, CPU: float16 caches, one-row linears through torch.ops.torchchat.gemv, a batch-1 step's blocks
        # through torch.ops.torchchat.decode_layers, one call a token (torchchat.cpu); without the ops, a
        # compiled step writes the linears as reductions (see cpu.GemvAsReduction).
        on_cpu = self.device.type == "cpu"
        if on_cpu:
            cpu.install(model)
        model.setup_caches(max_batch, max_seq_len)
        step = self._forward_one_reduced if on_cpu and not cpu.kernels.available() else self._forward_one
        self.compiled = compile
        self._decode_step = torch.compile(step, fullgraph=True, dynamic=False, options=COMPILE_OPTIONS) \
            if compile else self._forward_one

    @classmethod
    def from_source(cls, source, tokenizer, chat_format, *, max_seq_len: int, max_batch: int = 1,
                    dtype: str = "fp32", device: str = "cpu", compile: bool = False, quantize: str | None = None,
                    model_args=None, **kwargs) -> "LocalGenerator":
        """Load the weights of ``source`` and build a generator; reports the load time on stderr.

        ``model_args``: the source's ModelArgs when already read (the builder's Prepared has them); else read here.
        """
        from torchchat.checkpoint import load_model, read_model_args

        t0 = time.perf_counter()
        model = load_model(source, model_args or read_model_args(source), dtype=DTYPES[dtype], device=device)
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
        with torch.no_grad(), self._prefill_mode(), _output_layer_detached(self.model) as output:
            hidden = self.model(tokens, input_pos)  # (B, T, dim): the model passes through a missing output
            logits = output(hidden[:, -1])  # (B, V)
        return self.sample(logits)

    def decode_n_tokens(self, token: torch.Tensor, start_pos: int, n: int) -> Iterator[torch.Tensor]:
        for pos in range(start_pos, start_pos + n):
            input_pos = torch.tensor([pos], device=self.device)
            with torch.no_grad():
                logits = self._step(token.view(-1, 1), input_pos, first=pos == start_pos)  # (B, V)
            token = self.sample(logits)
            yield token

    def _step(self, token: torch.Tensor, input_pos: torch.Tensor, first: bool) -> torch.Tensor:
        """Speed: a compiled step checks Dynamo's guards (every parameter and buffer of the model: ~0.5 ms
        a SmolLM2 token) on the first step of each decode run only. Within a run nothing they cover can
        change (same model, caches, batch and shapes; only tensor values move), and the first step, fully
        checked, recompiles if a new turn changed any of it (a larger batch re-allocates the caches)."""
        if first or not self.compiled:
            return self._decode_step(token, input_pos)
        try:
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                return self._decode_step(token, input_pos)
        except RuntimeError as e:  # Dynamo found it must recompile after all: take the checked path
            if "skip_guard_eval_unsafe" not in str(e):
                raise
            return self._decode_step(token, input_pos)

    def _forward_one(self, token: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return self.model(token, input_pos)[:, -1]  # (B, V)

    def _forward_one_reduced(self, token: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """The decode step as compiled on CPU without the gemv op (see cpu.GemvAsReduction)."""
        with cpu.GemvAsReduction():
            return self._forward_one(token, input_pos)

    def _prefill_mode(self):
        """Speed: on a CPU without native bf16, a prompt's bf16/fp16 linears run as float32 GEMMs."""
        reduced = self.device.type == "cpu" and next(self.model.parameters()).dtype != torch.float32
        return cpu.Float32Linears() if reduced and not cpu.native_bf16() else contextlib.nullcontext()

    def _check_batch(self, batch: int):
        if batch > self.max_batch:
            self.max_batch = batch
            self.model.setup_caches(batch, self.max_seq_len)


@contextlib.contextmanager
def _output_layer_detached(model: Transformer):
    """Speed: run the prompt without the output layer and apply it to the last position only, as a
    pipeline stage would; the other positions' logits are never used. For SmolLM2's 49k vocabulary
    that is a fifth of a 512-token prefill's FLOPs. Yields the output layer; puts it back after."""
    output = model.output
    model.output = None
    try:
        yield output
    finally:
        model.output = output
