"""LocalGenerator: the whole model in this process, on CPU or CUDA."""

from __future__ import annotations

import contextlib
import time
import torch

from torchchat import cpu
from torchchat.generate.base import Generator
from torchchat.generate.scheduler import Step
from torchchat.generate.scoring import target_log_probs
from torchchat.model import Transformer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Inductor options for the compiled decode step. Speed, per token (SmolLM2 int4 on CPU, ~1 ms of ~15 in
# an A/B): no size/stride checks on every extern op's output (debug checks; the compiled tokens are
# tested against eager ones), and no OpenMP region for loops under 4096 elements (a decode step's norms,
# rotary and SwiGLU products are 576-8192 values: waking a thread costs more than it saves).
COMPILE_OPTIONS = {"size_asserts": False, "alignment_asserts": False, "scalar_asserts": False,
                   "cpp.min_chunk_size": 4096}


class LocalGenerator(Generator):
    """One process, ``max_batch`` KV cache rows. ``compile=True`` compiles the decode step (static shapes: one
    compilation per batch size seen)."""

    def __init__(self, model: Transformer, tokenizer, chat_format, *, max_seq_len: int, max_batch: int = 1,
                 compile: bool = False, **kwargs):
        device = next(model.parameters()).device
        super().__init__(model.args, tokenizer, chat_format, max_seq_len=max_seq_len, max_batch=max_batch,
                         device=device, **kwargs)
        self.model = model
        # Speed, CPU: float16 caches, one-row linears through torch.ops.torchchat.gemv, a batch-1 step's blocks
        # through torch.ops.torchchat.decode_layers, one call a token (torchchat.cpu); without the ops, a
        # compiled step writes the linears as reductions (see cpu.GemvAsReduction).
        on_cpu = self.device.type == "cpu"
        if on_cpu:
            cpu.install(model)
        model.setup_caches(max_batch, max_seq_len)
        self._last_shape = None  # of the latest decode step (see _step)
        step = self._forward_one_reduced if on_cpu and not cpu.kernels.available() else self._forward_one
        self.compiled = compile
        self._decode_step = torch.compile(step, fullgraph=True, dynamic=False, options=COMPILE_OPTIONS) \
            if compile else self._forward_one

    @classmethod
    def from_source(cls, source, tokenizer, chat_format, *, max_seq_len: int, max_batch: int = 1,
                    dtype: str = "fp32", device: str = "cpu", compile: bool = False, quantize: str | None = None,
                    keep_quantized: bool = False, model_args=None, **kwargs) -> "LocalGenerator":
        """Load the weights of ``source`` and build a generator; reports the load time and what the weights run as
        on stderr. ``keep_quantized``: the file's quantized weights stay quantized (checkpoint.load_model), ``dtype``
        is then the other weights' and the activations'.

        ``model_args``: the source's ModelArgs when already read (the builder's Prepared has them); else read here.
        """
        from torchchat.checkpoint import load_model, read_model_args
        from torchchat.quantize import describe_layers

        t0 = time.perf_counter()
        model = load_model(source, model_args or read_model_args(source), dtype=DTYPES[dtype], device=device,
                           keep_quantized=keep_quantized)
        if quantize:
            from torchchat.quantize import quantize_model
            quantize_model(model, quantize)
        gen = cls(model, tokenizer, chat_format, max_seq_len=max_seq_len, max_batch=max_batch, compile=compile,
                  **kwargs)
        gen.report(f"loaded {source.name} ({describe_layers(model, dtype)}, {device}) in "
                   f"{time.perf_counter() - t0:.2f} s")
        return gen

    def forward(self, step: Step) -> torch.Tensor:
        if step.verify and verify_as_rows(self.model, step):
            return self._verify_as_rows(step)  # (B, T, V)
        tokens = step.tokens.to(self.device)  # (B, T)
        input_pos, rows = positions_and_rows(step, self.device)
        with torch.no_grad():
            if tokens.size(1) == 1:
                return self._step(tokens, input_pos, rows)  # (B, V)
            with self._prefill_mode(), cpu.kernels.one_torch_thread_when_busy(self.device), \
                    _output_layer_detached(self.model) as output:
                hidden = self.model(tokens, input_pos, rows)  # (B, T, dim): the model passes through a missing output
                if step.targets is not None:  # scoring (Generator.score): (B, T) log-probabilities
                    return target_log_probs(output, hidden, step.targets.to(self.device))
                if step.verify:  # speculative decoding: every position's logits
                    return output(hidden)  # (B, T, V)
                return output(hidden[:, -1])  # (B, V)

    def _verify_as_rows(self, step: Step) -> torch.Tensor:
        """A verification step as a decode step of B * T rows (see verify_as_rows): (B, T, V)."""
        batch, seq_len = step.tokens.shape
        tokens, input_pos, rows = step_as_rows(step, self.device)
        with torch.no_grad():
            return self._forward_one(tokens, input_pos, rows).view(batch, seq_len, -1)  # eager: no recompiles

    def resize_batch(self, max_batch: int):
        self.model.setup_caches(max_batch, self.max_seq_len)
        self._resized(max_batch)
        self._last_shape = None  # new caches: the next step checks Dynamo's guards

    def _step(self, token: torch.Tensor, input_pos: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """Speed: a compiled step checks Dynamo's guards (every parameter and buffer of the model: ~0.5 ms
        a SmolLM2 token) only when the step's shapes change (batch size, shared or own positions). Between
        such changes nothing they cover can change (same model, caches, shapes; only tensor values move), and
        the first step of a new shape, fully checked, recompiles if it must."""
        shape = (token.size(0), input_pos.dim(), rows is None)
        first, self._last_shape = shape != self._last_shape, shape
        if first or not self.compiled:
            return self._decode_step(token, input_pos, rows)
        try:
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                return self._decode_step(token, input_pos, rows)
        except RuntimeError as e:  # Dynamo found it must recompile after all: take the checked path
            if "skip_guard_eval_unsafe" not in str(e):
                raise
            return self._decode_step(token, input_pos, rows)

    def _forward_one(self, token: torch.Tensor, input_pos: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        return self.model(token, input_pos, rows)[:, -1]  # (B, V)

    def _forward_one_reduced(self, token: torch.Tensor, input_pos: torch.Tensor,
                             rows: torch.Tensor | None) -> torch.Tensor:
        """The decode step as compiled on CPU without the gemv op (see cpu.GemvAsReduction)."""
        with cpu.GemvAsReduction():
            return self._forward_one(token, input_pos, rows)

    def _prefill_mode(self):
        """Speed: on a CPU without native bf16, a prompt's bf16/fp16 linears run as float32 GEMMs."""
        reduced = self.device.type == "cpu" and next(self.model.parameters()).dtype != torch.float32
        return cpu.Float32Linears() if reduced and not cpu.native_bf16() else contextlib.nullcontext()



def verify_as_rows(model, step: Step) -> bool:
    """Does a verification step (speculative decoding) run as a decode step of B * T rows through the CPU block op
    (row (i, j): token j of sequence i, at its position, in its cache row)? The op writes every row's keys and values
    into the caches before any row attends, each over its own filled positions, so row (i, j) sees its sequence's
    positions up to its own: the causal attention of a several-position forward. Each row is then computed as a
    plain decode step computes it, to the bit (its outputs do not depend on the rows beside it), so the verified
    tokens are exactly plain greedy decoding's, and the step costs a decode step's weight reads, not a prompt
    forward's dispatches. Up to ``kernels.MAX_GEMV_ROWS`` rows; larger steps take the prompt path."""
    return getattr(model, "decode_layers", None) is not None and step.tokens.numel() <= cpu.kernels.MAX_GEMV_ROWS


def step_as_rows(step: Step, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A step's B rows of T tokens as B * T rows of one token: tokens (B * T, 1), positions (B * T, 1), cache rows
    (B * T,)."""
    batch, seq_len = step.tokens.shape
    return (step.tokens.reshape(batch * seq_len, 1).to(device), step.input_pos.reshape(-1, 1).to(device),
            step.rows.repeat_interleave(seq_len).to(device))


def positions_and_rows(step: Step, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's ``input_pos`` and ``rows`` for a step. Rows 0 .. B-1 at the same positions (one sequence, the
    samples of one prompt) go as shared positions (T,) and no rows: the caches' leading rows are views, and a
    batch-1 decode step takes the fused CPU op. Otherwise (B, T) positions and (B,) rows."""
    batch, seq_len = step.tokens.shape
    positions, rows = step.positions.tolist(), step.rows.tolist()
    if rows == list(range(batch)) and len(set(positions)) == 1:
        return torch.arange(positions[0], positions[0] + seq_len, device=device), None
    return step.input_pos.to(device), step.rows.to(device)


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
