"""DistributedGenerator against LocalGenerator: the same tokens, token for token, on real processes.

Every TP x PP factorization that fits the tiny fixed-seed model (8 query / 4 KV heads, 4 layers),
several sequences at once through the pipeline (microbatches), a two-turn chat, and the real
SmolLM2 GGUF (9 / 3 heads, 30 layers: TP 3, PP 2, PP 3). Each job runs with a timeout.
"""

from __future__ import annotations

import io

import pytest
import torch

from tests.dist_utils import run_ranks
from tests.generators import load_parts, local_generator, scripted_user, tiny_source
from torchchat import cpu_kernels
from torchchat.catalog import ModelSource
from torchchat.checkpoint import load_model, read_model_args
from torchchat.distributed.parallel_dims import ParallelDims
from torchchat.generate.base import GenerationArgs
from torchchat.errors import ConfigError
from torchchat.model import KNOWN_MODELS, ModelArgs

GREEDY = GenerationArgs(max_new_tokens=16, temperature=0, top_k=None)
PROMPT = "The quick brown fox"
CHAT = ["Hello there", "Tell me more"]


def _build(source: ModelSource, world: int, tp: int, pp: int, **kwargs):
    from torchchat.chat_format import chat_format_for
    from torchchat.generate.distributed import DistributedGenerator
    from torchchat.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(source)
    return DistributedGenerator.from_source(source, tokenizer, chat_format_for(tokenizer, source),
                                            ParallelDims(tp, pp, world), out=io.StringIO(), err=io.StringIO(),
                                            **kwargs)


def generate_worker(rank: int, world: int, source: ModelSource, tp: int, pp: int, runs: list, kwargs: dict):
    """Each (prompt, args) of ``runs`` through run_generate; every rank returns its tokens."""
    gen = _build(source, world, tp, pp, **kwargs)
    try:
        return [[c.tokens for c in gen.run_generate(prompt if rank == 0 else None, args)] for prompt, args in runs]
    finally:
        gen.close()


def chat_worker(rank: int, world: int, source: ModelSource, tp: int, pp: int, lines: list[str], args):
    """A chat fed by a scripted user on rank 0; rank 0's transcript, and the reply count of every rank."""
    gen = _build(source, world, tp, pp, max_seq_len=256)
    try:
        replies = gen.run_chat(args, scripted_user(lines) if rank == 0 else _never_called)
        return gen.out.getvalue(), replies
    finally:
        gen.close()


def kernel_worker(rank: int, world: int, source: ModelSource, tp: int, pp: int):
    """Which of this rank's attention layers send decode steps to the CPU attention op, and does the rank send
    its batch-1 decode steps through the CPU block op."""
    gen = _build(source, world, tp, pp, max_seq_len=64)
    try:
        model = gen.runner.model if pp == 1 else gen.runner.module.model
        attention = [layer.attention.decode_attention is torch.ops.torchchat.decode_attention
                     for layer in model.layers.values()]
        return attention, isinstance(model.decode_layers, cpu_kernels.FusedDecode)
    finally:
        gen.close()


def _never_called():
    raise AssertionError("only rank 0 reads the user")


def _local_tokens(source, runs, max_seq_len, dtype=None):
    if dtype is None:
        gen = local_generator(source, max_seq_len=max_seq_len, max_batch=4)
    else:
        from torchchat.generate.local import DTYPES, LocalGenerator

        _, tokenizer, chat_format = load_parts(source)
        model = load_model(source, read_model_args(source), dtype=DTYPES[dtype])
        gen = LocalGenerator(model, tokenizer, chat_format, max_seq_len=max_seq_len, max_batch=4,
                             out=io.StringIO(), err=io.StringIO())
    return [[c.tokens for c in gen.run_generate(prompt, args)] for prompt, args in runs]


TINY_RUNS = [(PROMPT, GREEDY),
             ("Once upon a time, in a land far away", GenerationArgs(max_new_tokens=8, temperature=0))]
# Several sequences: greedy (all alike), and sampled with a seed (they differ, so each microbatch
# must use its own rows of the KV cache to match).
BATCH_RUNS = [(PROMPT, GenerationArgs(max_new_tokens=12, temperature=0, num_samples=3)),
              (PROMPT, GenerationArgs(max_new_tokens=12, temperature=1.0, top_k=None, seed=7, num_samples=4))]


@pytest.mark.parametrize("tp,pp", [(2, 1), (4, 1), (1, 2), (1, 3), (1, 4), (2, 2)], ids=lambda v: str(v))
def test_tiny_greedy_matches_local(tiny_model, tp, pp):
    source = tiny_source(tiny_model)
    expected = _local_tokens(source, TINY_RUNS, 64)
    results = run_ranks(generate_worker, tp * pp, source, tp, pp, TINY_RUNS, {"max_seq_len": 64}, timeout=90)
    for rank, tokens in enumerate(results):
        assert tokens == expected, f"rank {rank} (tp {tp}, pp {pp})"


@pytest.mark.skipif(not cpu_kernels.available(), reason="the CPU decode ops did not build here")
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=lambda v: str(v))
def test_cpu_ranks_attend_through_the_kernel(tiny_model, tp, pp):
    """Every layer of every rank (a TP shard's local heads, a stage's own layers): the parity tests above
    then compare those ranks' tokens with LocalGenerator's. A pipeline stage without TP also runs its layers'
    decode step in one block-op call, as LocalGenerator does; a TP rank's linears carry the collectives' hooks,
    so it keeps the modules."""
    results = run_ranks(kernel_worker, tp * pp, tiny_source(tiny_model), tp, pp, timeout=90)
    layers = tiny_model.args.n_layers
    assert [len(attention) for attention, _ in results] == ([layers] * tp if pp == 1 else [layers // pp] * pp)
    assert all(all(attention) for attention, _ in results)
    assert [fused for _, fused in results] == [tp == 1] * (tp * pp)


@pytest.mark.parametrize("tp,pp", [(1, 2), (2, 2)], ids=lambda v: str(v))
def test_tiny_several_sequences_through_the_pipeline(tiny_model, tp, pp):
    source = tiny_source(tiny_model)
    expected = _local_tokens(source, BATCH_RUNS, 64)
    assert len({tuple(seq) for seq in expected[1]}) > 1, "the sampled sequences should differ"
    results = run_ranks(generate_worker, tp * pp, source, tp, pp, BATCH_RUNS, {"max_seq_len": 64}, timeout=90)
    assert results[0] == expected
    assert all(r == results[0] for r in results), "every rank yields the same tokens"


def test_pipeline_in_bf16(tiny_model):
    """Activations cross stages in the model's dtype (receive buffers too): bf16 matches bf16 locally."""
    source = tiny_source(tiny_model)
    expected = _local_tokens(source, TINY_RUNS, 64, dtype="bf16")
    results = run_ranks(generate_worker, 2, source, 1, 2, TINY_RUNS, {"max_seq_len": 64, "dtype": "bf16"}, timeout=90)
    assert results[0] == expected


def test_tensor_parallel_dtensor_reference_matches(tiny_model):
    """The plain-tensor hot path and DTensor's own (the plan's meaning) give the same tokens."""
    source = tiny_source(tiny_model)
    runs = TINY_RUNS[:1]
    expected = _local_tokens(source, runs, 64)
    results = run_ranks(generate_worker, 2, source, 2, 1, runs, {"max_seq_len": 64, "localize_tp": False},
                        timeout=90)
    assert results[0] == expected


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=lambda v: str(v))
def test_chat_transcript_matches_local(tiny_model, tp, pp):
    source = tiny_source(tiny_model)
    args = GenerationArgs(max_new_tokens=12, temperature=0)
    local = local_generator(source, max_seq_len=256)
    assert local.run_chat(args, scripted_user(CHAT)) == 2
    results = run_ranks(chat_worker, tp * pp, source, tp, pp, CHAT, args, timeout=90)
    assert results[0] == (local.out.getvalue(), 2)
    assert [replies for _, replies in results] == [2] * (tp * pp)
    assert all(out == "" for out, _ in results[1:]), "only rank 0 writes"


@pytest.fixture(scope="module")
def smollm2_expected(smollm2_gguf):
    source = ModelSource("smollm2-135m", gguf_path=smollm2_gguf)
    return source, _local_tokens(source, SMOLLM2_RUNS, 64)


SMOLLM2_RUNS = [("The capital of France is", GenerationArgs(max_new_tokens=8, temperature=0))]


@pytest.mark.parametrize("tp,pp", [(3, 1), (1, 2), (1, 3)], ids=lambda v: str(v))
def test_smollm2_greedy_matches_local(smollm2_expected, tp, pp):
    source, expected = smollm2_expected
    results = run_ranks(generate_worker, tp * pp, source, tp, pp, SMOLLM2_RUNS, {"max_seq_len": 64}, timeout=150)
    assert results[0] == expected


# ----- user errors, before any process starts -----

def test_world_size_must_match():
    with pytest.raises(ConfigError, match=r"--tp 2 x --pp 2 = 4 processes, but the world size is 3: run torchrun "
                                          r"--nproc-per-node 4 \(or change --tp/--pp\)"):
        ParallelDims(tp=2, pp=2, world_size=3)
    with pytest.raises(ConfigError, match=r"--pp \(0\) must be at least 1"):
        ParallelDims(tp=1, pp=0, world_size=0)


def test_tp_must_divide_the_heads():
    with pytest.raises(ConfigError, match=r"--tp 2 must divide the query heads \(9\) and the key/value heads \(3\) "
                                          r"of smollm2-135m; try --tp 3"):
        ParallelDims(tp=2, pp=1, world_size=2).check_model(KNOWN_MODELS["smollm2-135m"])
    odd = ModelArgs(dim=35, n_layers=2, n_heads=7, vocab_size=101, hidden_dim=64)
    with pytest.raises(ConfigError, match="cannot be split by tensor parallelism: use --pp"):
        ParallelDims(tp=7, pp=1, world_size=7).check_model(odd, "odd")


def test_pp_must_not_exceed_the_layers():
    with pytest.raises(ConfigError, match=r"--pp 31 stages but smollm2-135m has 30 layers; use at most --pp 30"):
        ParallelDims(tp=1, pp=31, world_size=31).check_model(KNOWN_MODELS["smollm2-135m"])


def test_uneven_stages():
    assert [len(r) for r in ParallelDims(1, 4, 4).stage_layers(30)] == [8, 8, 7, 7]
    assert ParallelDims(1, 3, 3).stage_layers(30)[2] == range(20, 30)


def test_more_gpus_than_visible(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"needs 4 GPUs on this node but 2 are visible"):
        ParallelDims(tp=2, pp=2, world_size=4).check_devices("cuda")
    ParallelDims(tp=2, pp=2, world_size=4).check_devices("cpu")
