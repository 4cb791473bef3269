"""What the ranks of test_distributed_parity.py run, and what LocalGenerator gives for the same requests: the case
kinds (one generator each, in one launch of a layout's processes), the drafters they may use, and the local
references they are compared with."""

from __future__ import annotations

import io
from pathlib import Path

import torch

from tests.generators import load_parts, local_generator, scripted_user
from torchchat import cpu as cpu_kernels
from torchchat.catalog import ModelSource
from torchchat.checkpoint import load_model, read_model_args
from torchchat.distributed.parallel_dims import ParallelDims
from torchchat.generate.base import GenerationArgs, Turn
from torchchat.errors import ConfigError
from torchchat.generate.speculative import ModelDrafter, PromptLookupDrafter

CHAT_ARGS = GenerationArgs(max_new_tokens=12, temperature=0)
SPECULATE_K = 3  # the drafters' tokens a verification


def _build(source: ModelSource, world: int, tp: int, pp: int, **kwargs):
    from torchchat.chat_format import chat_format_for
    from torchchat.generate.distributed import DistributedGenerator
    from torchchat.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(source)
    return DistributedGenerator.from_source(source, tokenizer, chat_format_for(tokenizer, source),
                                            ParallelDims(tp, pp, world), out=io.StringIO(), err=io.StringIO(),
                                            **kwargs)


# ----- what each rank runs: cases, one generator each, in one launch of the processes -----

def layout_worker(rank: int, world: int, source: ModelSource, tp: int, pp: int, cases: dict):
    """Each case of ``cases`` (name -> (kind, generator kwargs, payload)) on a generator of its own."""
    results = {}
    for name, (kind, kwargs, payload) in cases.items():
        gen = _build(source, world, tp, pp, **kwargs)
        try:
            results[name] = CASE_KINDS[kind](gen, rank, payload)
        finally:
            gen.close()
    return results


def generate_case(gen, rank: int, runs: list):
    """run_generate for each (prompt, args): rank 0's tokens; the other ranks follow and return None."""
    return [_tokens(gen.run_generate(prompt if rank == 0 else None, args)) for prompt, args in runs]


def schedule_case(gen, rank: int, schedule: list):
    """Rank 0 submits each (at_step, prompt, args) of ``schedule`` once it has run ``at_step`` steps, and steps
    until every request ended: several requests in flight, joining while others decode. Every request's
    tokens, on rank 0; the other ranks follow."""
    if rank != 0:
        return gen.follow()
    in_flight = _count_in_flight(gen)
    try:
        pending, requests, steps = list(schedule), [], 0
        while pending or not all(r is None or r.done for r in requests):
            while pending and pending[0][0] <= steps:
                _, prompt, args = pending.pop(0)
                requests.append(_submit(gen, prompt, args))
            gen.step()
            steps += 1
    finally:
        gen.end_session()
    for r in requests:
        if r is not None and r.error is not None:
            raise r.error
    return [REFUSED if r is None else _tokens(r.completions) for r in requests], max(in_flight)


REFUSED = "refused"


def _submit(gen, prompt: str, args):
    """The request, or None where rank 0 refuses it (it never reaches the other ranks)."""
    try:
        return gen.submit(Turn(gen.encode_prompt(prompt), args))
    except ConfigError:
        return None


def _count_in_flight(gen) -> list[int]:
    """Steps started and not yet finished, after each start (the pipeline's depth as the schedule uses it)."""
    seen, start, finish = [0], gen.start, gen.finish

    def counted_start(step):
        start(step)
        seen.append(seen[-1] + 1)

    def counted_finish():
        seen.append(seen[-1] - 1)
        return finish()
    gen.start, gen.finish = counted_start, counted_finish
    return seen


def chat_case(gen, rank: int, lines: list[str]):
    """A chat fed by a scripted user on rank 0: its transcript and the replies' tokens (rank 0)."""
    replies = recording_replies(gen)
    assert gen.run_chat(CHAT_ARGS, scripted_user(lines) if rank == 0 else _never_called) == len(replies)
    return gen.out.getvalue(), replies


def kernel_case(gen, rank: int, _payload):
    """Which of this rank's attention layers send decode steps to the CPU attention op, does the rank send
    its batch-1 decode steps through the CPU block op, and the types of its linear layers."""
    model = gen.part.model
    attention = [layer.attention.decode_attention is torch.ops.torchchat.decode_attention
                 for layer in model.layers.values()]
    modules = list(model.modules()) + ([gen.part.output] if gen.part.output is not None else [])
    linears = {type(m).__name__ for m in modules if hasattr(m, "weight") and m.weight.dim() == 2
               and not isinstance(m, torch.nn.Embedding)}
    return attention, isinstance(model.decode_layers, cpu_kernels.FusedDecode), linears


def score_case(gen, rank: int, text: tuple[list[int], int]):
    """The perplexity of ``text`` (tokens, window) through ``gen`` (eval's protocol), and each window's scored
    log-probabilities (windows, window - 1 - window // 2), on rank 0; the other ranks follow."""
    from torchchat.perplexity import perplexity

    if rank != 0:
        return gen.follow()
    scored, score = [], gen.score

    def recording(*args):
        scored.extend(score(*args))
        return scored
    gen.score = recording
    try:
        result = perplexity(gen, *text)
    finally:
        gen.end_session()
    return result.perplexity, result.tokens, torch.stack(scored)


def speculative_schedule_case(gen, rank: int, schedule: list):
    """schedule_case with a drafter on rank 0: every request's tokens and the verification steps rank 0 started."""
    verified = []
    start = gen.start

    def counted_start(step):
        verified.append(step.verify)
        start(step)
    gen.start = counted_start
    result = schedule_case(gen, rank, schedule)
    return result if rank != 0 else (result[0], sum(verified))


def speculative_chat_case(gen, rank: int, lines: list[str]):
    """chat_case with a drafter on rank 0, and the draft tokens it proposed (rank 0)."""
    transcript = chat_case(gen, rank, lines)
    return transcript if rank != 0 else (transcript, gen.last_stats.drafted)


CASE_KINDS = {"generate": generate_case, "schedule": schedule_case, "chat": chat_case, "kernels": kernel_case,
              "score": score_case, "speculative schedule": speculative_schedule_case,
              "speculative chat": speculative_chat_case}


def lookup_drafter():
    """The drafter of the speculative cases (built on rank 0 only, by DistributedGenerator.from_source)."""
    return PromptLookupDrafter(SPECULATE_K, 2)


def tiny_drafter(checkpoint: str, tokenizer: str, max_seq_len: int, quantize: str | None = None):
    """A draft model in rank 0's process: another tiny model (other weights, the same tokenizer), or ``quantize``d
    the model's own weights (self-drafting, --draft-quantize)."""
    from torchchat.generate.local import LocalGenerator
    from torchchat.quantize import quantize_model

    source = ModelSource("draft", checkpoint_path=Path(checkpoint), tokenizer_path=Path(tokenizer))
    model, tokenizer, chat_format = load_parts(source)
    if quantize:
        quantize_model(model, quantize)
    return ModelDrafter(SPECULATE_K, LocalGenerator(model, tokenizer, chat_format, max_seq_len=max_seq_len,
                                                    out=io.StringIO(), err=io.StringIO()))


def _tokens(completions):
    return None if completions is None else [c.tokens for c in completions]


def recording_replies(gen) -> list:
    """The tokens of every reply ``gen`` completes from now on (the chat session calls ``gen.run_until``)."""
    replies, run_until = [], gen.run_until

    def recording(request):
        run_until(request)
        replies.append(_tokens(request.completions))
    gen.run_until = recording
    return replies


def _never_called():
    raise AssertionError("only rank 0 reads the user")


def assert_followers_hold_nothing(results: list, case: str):
    """The ranks other than 0 keep no request state: they returned no tokens."""
    held = [rank for rank, r in enumerate(results[1:], 1) if r[case] not in (None, [None] * len(r[case] or []))]
    assert not held, f"{case}: rank(s) {held} returned tokens: only rank 0 holds the requests"


# ----- what LocalGenerator gives -----

def local_reference(source, max_seq_len, dtype=None, block_op=True, **kwargs):
    """A LocalGenerator; ``block_op=False``: its batch-1 decode steps through the modules instead of the CPU block
    op (``Transformer.decode_layers``), as a TP rank runs them."""
    if dtype is None:
        gen = local_generator(source, max_seq_len=max_seq_len, max_batch=4, **kwargs)
    else:
        from torchchat.generate.local import DTYPES, LocalGenerator

        _, tokenizer, chat_format = load_parts(source)
        model = load_model(source, read_model_args(source), dtype=DTYPES[dtype])
        gen = LocalGenerator(model, tokenizer, chat_format, max_seq_len=max_seq_len, max_batch=4,
                             out=io.StringIO(), err=io.StringIO(), **kwargs)
    if not block_op:
        gen.model.decode_layers = None
    return gen


def local_tokens(source, runs, max_seq_len, dtype=None, block_op=True):
    gen = local_reference(source, max_seq_len, dtype, block_op)
    return [_tokens(gen.run_generate(prompt, args)) for prompt, args in runs]


def local_alone(source, schedule, max_seq_len, **kwargs):
    """Each request of a schedule alone through LocalGenerator, one after the other (no prefix reuse: each
    prompt is fed whole, as in the schedule)."""
    gen = local_reference(source, max_seq_len, prefix_reuse=False, **kwargs)
    return [REFUSED if (request := _submit(gen, prompt, args)) is None else _alone(gen, request)
            for _, prompt, args in schedule]


def _alone(gen, request):
    gen.run_until(request)
    return _tokens(request.completions)
