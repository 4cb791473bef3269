"""DistributedGenerator against LocalGenerator: the same tokens, token for token, on real processes.

Every TP x PP factorization that fits the tiny fixed-seed model (8 query / 4 KV heads, 4 layers); several
requests in flight at once, joining at different steps (TP 2, PP 2, TP 2 x PP 2), each getting the tokens
LocalGenerator gives it alone; a two-turn chat; and the real SmolLM2 GGUF (9 / 3 heads, 30 layers: TP 3,
PP 2 with 4 requests at once, PP 3). Rank 0 schedules and samples: it holds every request's tokens; the
other ranks follow and hold none (checked too).

Each layout starts its processes once (``launched``): one job runs every case of that layout in turn, each
on a generator of its own, with a timeout.
"""

from __future__ import annotations

import functools

import pytest
import torch

from tests.dist_utils import run_ranks
from tests.parity_workers import (CHAT_ARGS, REFUSED, SPECULATE_K, assert_followers_hold_nothing, layout_worker,
                                  local_alone, local_reference, local_tokens, lookup_drafter, recording_replies,
                                  score_case, tiny_drafter)
from tests.generators import local_generator, scripted_user, tiny_source
from tests.model_assets import write_tiny_model
from torchchat import cpu as cpu_kernels
from torchchat.catalog import ModelSource
from torchchat.generate.base import GenerationArgs

GREEDY = GenerationArgs(max_new_tokens=16, temperature=0, top_k=None)
PROMPT = "The quick brown fox"
CHAT = ["Hello there", "Tell me more"]


TINY_RUNS = [(PROMPT, GREEDY),
             ("Once upon a time, in a land far away", GenerationArgs(max_new_tokens=8, temperature=0))]
# Several sequences of one request: greedy (all alike), and sampled with a seed (they differ, so each must use
# its own row of the KV cache to match). The generator starts with one cache row: every rank grows its caches
# when rank 0 says so (a resize plan).
BATCH_RUNS = [(PROMPT, GenerationArgs(max_new_tokens=12, temperature=0, num_samples=3)),
              (PROMPT, GenerationArgs(max_new_tokens=12, temperature=1.0, top_k=None, seed=7, num_samples=4))]
# Requests joining at different steps (the number of steps run before each is submitted), in 4 cache rows and
# prompt chunks of 8 tokens: A's prompt takes 5 chunks while B decodes; C's two seeded samples join at step 3;
# a request that cannot fit is refused on rank 0 alone; D finds every row taken and joins when B leaves. Seeded
# sampling too: a sequence draws from its own generator on rank 0, whatever runs beside it.
SCHEDULE = [(0, "Once upon a time, in a land far away", GenerationArgs(max_new_tokens=16, temperature=0)),
            (0, "Hello there", GenerationArgs(max_new_tokens=10, temperature=0.8, top_k=50, seed=11)),
            (3, "The capital of France is", GenerationArgs(max_new_tokens=12, temperature=1.0, seed=5,
                                                           num_samples=2)),
            (4, "x" * 200, GenerationArgs(max_new_tokens=10, temperature=0)),  # longer than the context: refused
            (6, "In the beginning", GenerationArgs(max_new_tokens=10, temperature=0))]
SCHEDULE_KWARGS = {"max_seq_len": 128, "max_batch": 4, "prefill_chunk": 8}
# `eval` (Generator.score): 5 windows of 32 tokens and a tail, 2 windows a step (3 steps; at PP 2 two in flight,
# in rows of their own), plans outgrowing prompt chunks of 8 tokens (a grow plan). The byte tokenizer: a byte is
# a token.
SCORE_WINDOW = 32
SCORE_TOKENS = list(("The quick brown fox jumps over the lazy dog. " * 4).encode())[:5 * SCORE_WINDOW + 7]
# TP 2 and TP 2 x PP 2 against one process, measured: 2.8e-6 of the perplexity (relative), 4.2e-4 at most in a
# position's log-probability (the row-wise layers' sums in another order, through the float16 KV cache; a
# full-vocabulary log-softmax of the same TP ranks' hidden states (DTensor's gathered logits) parts from the
# vocab-parallel one by about 1e-8 of the perplexity).
SCORE_TP_PERPLEXITY = 6e-6
SCORE_TP_LOG_PROB = 8e-4

# Speculative decoding through the parallel model: the greedy requests of SCHEDULE with prompt lookup (rows of one
# verification drafting different amounts, a prompt chunk beside them), and the chat with a draft model in rank
# 0's process (TP 2: another tiny model; PP 2: the model's own weights in int4); each against the model's plain
# greedy output in one process.
SPEC_SCHEDULE = [entry for entry in SCHEDULE if entry[2].temperature == 0]
SPEC_LAYOUTS = [(2, 1), (1, 2), (2, 2)]
SPEC_CHAT_LAYOUTS = [(2, 1), (1, 2)]

# Which cases run on which layout of the tiny model (one launch each).
BATCH_LAYOUTS = [(1, 2), (2, 2)]
SCHEDULE_LAYOUTS = [(2, 1), (1, 2), (2, 2)]
CHAT_LAYOUTS = [(2, 1), (1, 2)]
KERNEL_LAYOUTS = [(2, 1), (1, 2)]


def tiny_cases(tp: int, pp: int, draft, model) -> dict:
    cases = {"greedy": ("generate", {"max_seq_len": 64}, TINY_RUNS)}
    if (tp, pp) in SPEC_LAYOUTS:
        cases["speculative schedule"] = ("speculative schedule", {**SCHEDULE_KWARGS, "speculate_k": SPECULATE_K,
                                                                  "make_drafter": lookup_drafter}, SPEC_SCHEDULE)
    if (tp, pp) in SPEC_CHAT_LAYOUTS:
        # TP 2: another model drafts; PP 2: the model's own weights in int4
        drafting = (draft, None) if pp == 1 else (model, "int4")
        make = functools.partial(tiny_drafter, str(drafting[0].checkpoint), str(drafting[0].tokenizer), 256,
                                 drafting[1])
        cases["speculative chat"] = ("speculative chat", {"max_seq_len": 256, "speculate_k": SPECULATE_K,
                                                          "make_drafter": make}, CHAT)
    if (tp, pp) in BATCH_LAYOUTS:
        cases["batch"] = ("generate", {"max_seq_len": 64}, BATCH_RUNS)
    if (tp, pp) in SCHEDULE_LAYOUTS:
        cases["schedule"] = ("schedule", SCHEDULE_KWARGS, SCHEDULE)
        cases["score"] = ("score", {"max_seq_len": SCORE_WINDOW, "max_batch": 2 * pp, "prefill_chunk": 8},
                          (SCORE_TOKENS, SCORE_WINDOW))
    if (tp, pp) in CHAT_LAYOUTS:
        cases["chat"] = ("chat", {"max_seq_len": 256}, CHAT)
    if (tp, pp) in KERNEL_LAYOUTS and cpu_kernels.available():
        cases["kernels"] = ("kernels", {"max_seq_len": 64}, None)
    if (tp, pp) == (1, 2):
        cases["bf16"] = ("generate", {"max_seq_len": 64, "dtype": "bf16"}, TINY_RUNS)
    if (tp, pp) == (2, 1):
        cases["dtensor"] = ("generate", {"max_seq_len": 64, "localize_tp": False}, TINY_RUNS[:1])
        cases["tp_bf16"] = ("generate", {"max_seq_len": 128, "dtype": "bf16"}, BF16_RUNS)
    return cases


@pytest.fixture(scope="module")
def launched(tiny_model, tmp_path_factory):
    """launched(tp, pp): every rank's results of every case of that layout, from one launch (cached)."""
    source, done = tiny_source(tiny_model), {}
    draft = write_tiny_model(tmp_path_factory.mktemp("tiny_draft"), seed=1)

    def launch(tp: int, pp: int) -> list[dict]:
        if (tp, pp) not in done:
            done[(tp, pp)] = run_ranks(layout_worker, tp * pp, source, tp, pp, tiny_cases(tp, pp, draft, tiny_model),
                                       timeout=300)
        return done[(tp, pp)]
    return launch


def rank0(results: list[dict], case: str):
    assert_followers_hold_nothing(results, case)
    return results[0][case]


@pytest.mark.parametrize("tp,pp", [(2, 1), (4, 1), (1, 2), (1, 3), (1, 4), (2, 2)], ids=lambda v: str(v))
def test_tiny_greedy_matches_local(tiny_model, launched, tp, pp):
    expected = local_tokens(tiny_source(tiny_model), TINY_RUNS, 64)
    assert rank0(launched(tp, pp), "greedy") == expected, f"tp {tp}, pp {pp}"


@pytest.mark.parametrize("tp,pp", SCHEDULE_LAYOUTS, ids=lambda v: str(v))
def test_requests_joining_at_different_steps_each_match_local_alone(tiny_model, launched, tp, pp):
    expected = local_alone(tiny_source(tiny_model), SCHEDULE, 128, prefill_chunk=8)
    assert len({tuple(seq) for seq in expected[2]}) == 2, "the seeded samples should differ"
    assert expected[3] == REFUSED
    got, depth = rank0(launched(tp, pp), "schedule")
    parted = [i for i, (g, e) in enumerate(zip(got, expected)) if g != e]
    assert not parted, f"tp {tp}, pp {pp}: requests {parted} differ from LocalGenerator's alone:\n{got}\n{expected}"
    assert depth == pp, f"{depth} steps in flight at most: a pipeline of {pp} stages keeps one group in each"


@pytest.mark.parametrize("tp,pp", SCHEDULE_LAYOUTS, ids=lambda v: str(v))
def test_perplexity_matches_local(tiny_model, launched, tp, pp):
    """`eval` through the stages and the TP shards gives one process's figure: exactly where only the layers are
    split between stages (each rank computes them as one process does), to float tolerance under TP, whose
    row-wise layers add their float32 partial sums in another order (the logits' log-softmax is vocab-parallel)."""
    expected = score_case(local_reference(tiny_source(tiny_model), SCORE_WINDOW), 0, (SCORE_TOKENS, SCORE_WINDOW))
    perplexity, tokens, log_probs = rank0(launched(tp, pp), "score")
    assert tokens == expected[1] == 5 * (SCORE_WINDOW - 1 - SCORE_WINDOW // 2)
    if tp == 1:
        assert perplexity == expected[0] and torch.equal(log_probs, expected[2]), f"pp {pp}"
        return
    assert abs(perplexity / expected[0] - 1) < SCORE_TP_PERPLEXITY, f"tp {tp}, pp {pp}: {perplexity} vs {expected[0]}"
    assert torch.allclose(log_probs, expected[2], rtol=0, atol=SCORE_TP_LOG_PROB), f"tp {tp}, pp {pp}"


@pytest.mark.skipif(not cpu_kernels.available(), reason="the CPU decode ops did not build here")
@pytest.mark.parametrize("tp,pp", KERNEL_LAYOUTS, ids=lambda v: str(v))
def test_cpu_ranks_attend_through_the_kernel(tiny_model, launched, tp, pp):
    """Every layer of every rank (a TP shard's local heads, a stage's own layers): the parity tests above
    then compare those ranks' tokens with LocalGenerator's. A pipeline stage without TP also runs its layers'
    decode step in one block-op call, as LocalGenerator does; a TP rank's layers all-reduce inside the block,
    so it keeps the modules, its one-row linears through the gemv op all the same (no plain nn.Linear left:
    localize's row-wise and output layers call it themselves)."""
    results = [r["kernels"] for r in launched(tp, pp)]
    layers = tiny_model.args.n_layers
    assert [len(attention) for attention, _, _ in results] == ([layers] * tp if pp == 1 else [layers // pp] * pp)
    assert all(all(attention) for attention, _, _ in results)
    assert [fused for _, fused, _ in results] == [tp == 1] * (tp * pp)
    expected = {"GemvLinear", "RowwiseLinear", "GatheredLinear"} if tp > 1 else {"GemvLinear"}
    assert [linears for _, _, linears in results] == [expected] * (tp * pp)


@pytest.mark.parametrize("tp,pp", BATCH_LAYOUTS, ids=lambda v: str(v))
def test_tiny_several_sequences_through_the_pipeline(tiny_model, launched, tp, pp):
    expected = local_tokens(tiny_source(tiny_model), BATCH_RUNS, 64)
    assert len({tuple(seq) for seq in expected[1]}) > 1, "the sampled sequences should differ"
    assert rank0(launched(tp, pp), "batch") == expected, f"tp {tp}, pp {pp}, several sequences"


def test_pipeline_in_bf16(tiny_model, launched):
    """Activations cross stages in the model's dtype (receive buffers too): bf16 matches bf16 locally."""
    expected = local_tokens(tiny_source(tiny_model), TINY_RUNS, 64, dtype="bf16")
    assert rank0(launched(1, 2), "bf16") == expected


# TP 2 in bf16: 8 prompts of 32 greedy tokens (the byte tokenizer: a prompt's length in tokens is its length
# in bytes, + 1). A TP rank computes a layer as one process's modules do, float32 partial sums rounded once
# included (RowwiseLinear), but for the order of the row-wise layers' float32 additions, which can move a value
# to the neighbouring bf16; one process's CPU block op also rounds a few values otherwise than its modules.
BF16_PROMPTS = ["The quick brown fox", "Once upon a time, in a land far away", "Hello there",
                "The capital of France is", "In the beginning", "To be or not to be", "lazy dog jumps over",
                "far away in a land"]
BF16_RUNS = [(prompt, GenerationArgs(max_new_tokens=32, temperature=0)) for prompt in BF16_PROMPTS]
# Prompts of BF16_PROMPTS whose tokens may part from LocalGenerator's as it runs (through the block op). Measured:
# 1 ("The quick brown fox", at its 14th token, where the block op and the modules part: the TP ranks follow the
# modules). Against the modules: 0 of these 8 and of 24 other prompts (TP 4: 2 of 32). Rounding each partial sum
# to bf16 before the all-reduce, as DTensor's RowwiseParallel does, parted on 4 of these 8.
BF16_TP2_PARTED_AT_MOST = 1


def test_tensor_parallel_dtensor_reference_matches(tiny_model, launched):
    """The plain-tensor hot path and DTensor's own (the plan's meaning) give the same tokens."""
    expected = local_tokens(tiny_source(tiny_model), TINY_RUNS[:1], 64)
    assert rank0(launched(2, 1), "dtensor") == expected, "tp 2, DTensor"


def test_tensor_parallel_in_bf16(tiny_model, launched):
    """Rank 0 yields one bf16 process's tokens when it runs the modules; LocalGenerator's but for the rare
    near tie (see above)."""
    source, results = tiny_source(tiny_model), rank0(launched(2, 1), "tp_bf16")
    assert results == local_tokens(source, BF16_RUNS, 128, dtype="bf16", block_op=False), \
        "tp 2 bf16 vs one process's modules"
    expected = local_tokens(source, BF16_RUNS, 128, dtype="bf16")
    parted = [prompt for prompt, got, want in zip(BF16_PROMPTS, results, expected) if got != want]
    assert len(parted) <= BF16_TP2_PARTED_AT_MOST, f"tp 2 bf16 parted from LocalGenerator's on {parted}"


def _local_chat(tiny_model) -> tuple[str, list]:
    """CHAT through one process: its transcript and its replies' tokens."""
    local = local_generator(tiny_source(tiny_model), max_seq_len=256)
    replies = recording_replies(local)
    assert local.run_chat(CHAT_ARGS, scripted_user(CHAT)) == 2
    return local.out.getvalue(), replies


@pytest.mark.parametrize("tp,pp", CHAT_LAYOUTS, ids=lambda v: str(v))
def test_chat_transcript_matches_local(tiny_model, launched, tp, pp):
    results = [r["chat"] for r in launched(tp, pp)]
    assert results[0] == _local_chat(tiny_model)
    assert results[1:] == [("", [])] * (tp * pp - 1), "only rank 0 writes, and holds the replies"


@pytest.mark.parametrize("tp,pp", SPEC_LAYOUTS, ids=lambda v: str(v))
def test_speculative_requests_in_flight_give_plain_greedy_tokens(tiny_model, launched, tp, pp):
    """Prompt lookup on rank 0, verification steps through the TP shards and the stages (the plans carry k + 1
    tokens a row, the logits come back at every position): each request's tokens are one process's plain greedy
    ones, alone."""
    expected = local_alone(tiny_source(tiny_model), SPEC_SCHEDULE, 128, prefill_chunk=8)
    got, verifications = rank0(launched(tp, pp), "speculative schedule")
    assert got == expected, f"tp {tp}, pp {pp}"
    assert verifications > 0, "no verification step ran"


@pytest.mark.parametrize("tp,pp", SPEC_CHAT_LAYOUTS, ids=lambda v: str(v))
def test_speculative_chat_with_a_draft_model_matches_plain_local(tiny_model, launched, tp, pp):
    results = [r["speculative chat"] for r in launched(tp, pp)]
    transcript, drafted = results[0]
    assert transcript == _local_chat(tiny_model) and drafted > 0
    assert results[1:] == [("", [])] * (tp * pp - 1), "only rank 0 writes, and holds the replies"


# ----- SmolLM2 -----

SMOLLM2_RUNS = [("The capital of France is", GenerationArgs(max_new_tokens=8, temperature=0))]
# Four requests at once through 2 stages: two groups of sequences in the pipe, a prompt among them.
SMOLLM2_SCHEDULE = [(0, "The capital of France is", GenerationArgs(max_new_tokens=8, temperature=0)),
                    (0, "Once upon a time", GenerationArgs(max_new_tokens=8, temperature=0)),
                    (0, "The best way to learn a language is", GenerationArgs(max_new_tokens=8, temperature=0)),
                    (2, "Water boils at", GenerationArgs(max_new_tokens=8, temperature=0))]


def smollm2_cases(tp: int, pp: int) -> dict:
    cases = {"greedy": ("generate", {"max_seq_len": 64}, SMOLLM2_RUNS)}
    if (tp, pp) == (1, 2):
        cases["schedule"] = ("schedule", {"max_seq_len": 64, "max_batch": 4}, SMOLLM2_SCHEDULE)
    return cases


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return ModelSource("smollm2-135m", gguf_path=smollm2_gguf)


@pytest.mark.parametrize("tp,pp", [(3, 1), (1, 2), (1, 3)], ids=lambda v: str(v))
def test_smollm2_matches_local(smollm2, tp, pp):
    results = run_ranks(layout_worker, tp * pp, smollm2, tp, pp, smollm2_cases(tp, pp), timeout=240)
    assert rank0(results, "greedy") == local_tokens(smollm2, SMOLLM2_RUNS, 64), f"smollm2, tp {tp}, pp {pp}"
    if "schedule" in results[0]:
        expected = local_alone(smollm2, SMOLLM2_SCHEDULE, 64)
        assert rank0(results, "schedule") == (expected, pp), f"smollm2, tp {tp}, pp {pp}, 4 requests at once"
