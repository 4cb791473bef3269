"""Speculative decoding (torchchat/generate/speculative.py and the scheduler's verification steps): greedy output
equal to plain greedy token for token with every drafter (prompts, chat turns, several requests in flight), the
rejection rule's distribution (exactly, on made-up distributions, and end to end on a tiny model), seeds, stats."""

from __future__ import annotations

import pytest
import torch

from tests.cli_process import one_line_error, torchchat
from tests.generators import local_generator, scripted_user, tiny_source
from tests.model_assets import write_tiny_model
from torchchat import cpu as cpu_kernels
from torchchat.errors import ConfigError
from torchchat.generate.base import GenerationArgs, Turn
from torchchat.generate.local import verify_as_rows
from torchchat.generate.sampling import probabilities
from torchchat.generate.scheduler import Step
from torchchat.generate.speculative import (Draft, Drafter, ModelDrafter, PromptLookupDrafter, check_speculate_k,
                                            lookup, verify_greedy, verify_sampled)

PROMPTS = ["the cat sat on the mat and the cat sat on the", "Once upon a time", "abc abc abc abc", "x"]
GREEDY = GenerationArgs(48, temperature=0)


@pytest.fixture(scope="module")
def other_tiny(tmp_path_factory):
    """A second tiny model, other weights (seed 1), the same tokenizer: a draft that is often wrong."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny_draft"), seed=1)


def drafters(tiny, other_tiny, k: int = 4, max_seq_len: int = 256, max_batch: int = 1):
    """Every kind of drafter, by name."""
    def model_drafter(model):
        return ModelDrafter(k, local_generator(tiny_source(model), max_seq_len, max_batch=max_batch))
    return {"lookup": lambda: PromptLookupDrafter(k, 3), "same model": lambda: model_drafter(tiny),
            "other model": lambda: model_drafter(other_tiny)}


# ----- the pieces -----


def test_lookup_copies_what_followed_the_latest_occurrence_of_the_longest_ngram():
    context = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    assert lookup(context, 3, 4) == [7, 8, 5, 2]  # [2, 3] (no earlier [5, 2, 3]): latest at 5, then 7 8 5 2
    assert lookup([1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3], 3, 2) == [7, 8]  # [1, 2, 3] latest at 4
    assert lookup([4, 5, 6], 3, 4) == []  # nothing earlier
    assert lookup([4, 5, 4], 3, 0) == [] and lookup([4, 5, 4], 3, 1) == [5]
    assert lookup([7, 7, 7, 7], 2, 3) == [7]  # the tail itself is never its own match


def test_verify_greedy_keeps_the_agreeing_prefix_and_the_targets_next_token():
    logits = torch.full((4, 10), -1.0)
    for j, best in enumerate([3, 5, 1, 8]):
        logits[j, best] = 1.0
    assert verify_greedy(logits, [3, 5, 1]) == [3, 5, 1, 8]
    assert verify_greedy(logits, [3, 6, 1]) == [3, 5]
    assert verify_greedy(logits[:1], []) == [3]


@pytest.mark.parametrize("kind", ["sampled q", "one-hot q"])
def test_rejection_rule_gives_the_targets_distribution_whatever_the_draft(kind):
    """The first token out of a verification of one draft token follows p exactly (total variation within
    sampling noise of 20,000 draws), although the draft token comes from q, far from p. Keeping every draft
    token, or drawing the correction from p instead of max(p - q, 0), gives q or a mixture: TV > 0.1."""
    torch.manual_seed(0)
    p_logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    q = torch.tensor([0.05, 0.05, 0.1, 0.2, 0.3, 0.3])
    args = GenerationArgs(8, temperature=1.0, top_k=None)
    p = probabilities(p_logits.view(1, -1), 1.0, None, 1.0)[0]
    rng = torch.Generator().manual_seed(1)
    logits = torch.stack([p_logits, p_logits])  # (2, V): at the newest token and after the draft token
    counts = torch.zeros(6)
    n = 20_000
    for _ in range(n):
        if kind == "sampled q":
            token = int(torch.multinomial(q, 1, generator=rng))
            draft = Draft([token], q.view(1, -1))
        else:
            draft = Draft([4])  # a drafter that always proposes token 4 (prompt lookup)
        counts[verify_sampled(logits, draft, args, rng)[0]] += 1
    tv = 0.5 * (counts / n - p).abs().sum()
    assert tv < 0.02, (counts / n, p)


def test_sampled_speculation_follows_the_models_distribution_end_to_end(tiny_model, other_tiny):
    """The tiny model, top-k 3, 3 new tokens from one prompt: the second and third come from one verification of a
    token drafted by another model. 2,048 samples' joint distribution of the 3 tokens against the exact one
    (from the model's own logits): total variation below 0.1 (sampling noise ~0.05 over <= 27 outcomes; a drafter
    whose tokens were always kept gives > 0.3)."""
    args = GenerationArgs(3, temperature=1.0, top_k=3, num_samples=64)
    prompt = [1, 2, 3, 4]
    gen = local_generator(tiny_source(tiny_model), 64, max_batch=64,
                          drafter=ModelDrafter(1, local_generator(tiny_source(other_tiny), 64, max_batch=64)))
    counts: dict[tuple, int] = {}
    for seed in range(32):
        for c in gen.complete(Turn(prompt, GenerationArgs(**{**args.__dict__, "seed": seed}))):
            counts[tuple(c.tokens)] = counts.get(tuple(c.tokens), 0) + 1
    assert gen.last_stats.verifications == 64 and gen.last_stats.drafted == 64
    plain = local_generator(tiny_source(tiny_model), 64)
    exact = exact_distribution(plain, prompt, 3, top_k=3)
    n = sum(counts.values())
    tv = 0.5 * sum(abs(counts.get(t, 0) / n - exact.get(t, 0.0)) for t in set(counts) | set(exact))
    assert tv < 0.1, tv


def exact_distribution(gen, prompt: list[int], length: int, top_k: int) -> dict[tuple, float]:
    """Every continuation of ``length`` tokens with its probability under temperature 1 and ``top_k``, from the
    model's logits (one prompt forward per prefix)."""
    def next_probs(tokens):
        gen.model.setup_caches(1, 64)
        with torch.no_grad():
            logits = gen.model(torch.tensor([tokens]), torch.arange(len(tokens)))[:, -1]
        return probabilities(logits, 1.0, top_k, 1.0)[0]
    out = {(): 1.0}
    for _ in range(length):
        grown = {}
        for prefix, pr in out.items():
            probs = next_probs(prompt + list(prefix))
            for token in torch.nonzero(probs).flatten().tolist():
                grown[prefix + (token,)] = pr * float(probs[token])
        out = grown
    return out


@pytest.mark.skipif(not cpu_kernels.available(), reason="the CPU decode ops did not build here")
def test_a_verification_step_computes_each_position_as_a_plain_decode_step_to_the_bit(tiny_model):
    """Two sequences, 4 positions each, in one verification step (8 rows of the CPU block op, two to a cache row):
    every position's logits equal, bit for bit, those of one-token decode steps fed the same tokens."""
    torch.manual_seed(0)
    gen = local_generator(tiny_source(tiny_model), 64, max_batch=2)
    assert verify_as_rows(gen.model, Step(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, dtype=torch.long),
                                          torch.arange(2), verify=True))
    prompts = torch.randint(0, 512, (2, 10))
    feed = torch.randint(0, 512, (2, 4))

    def prefill():
        for row in range(2):
            gen.forward(Step(prompts[row:row + 1], torch.tensor([0]), torch.tensor([row]), prefill=True))
    prefill()
    verified = gen.forward(Step(feed, torch.tensor([10, 10]), torch.tensor([0, 1]), verify=True))  # (2, 4, V)
    prefill()
    for j in range(4):
        stepped = gen.forward(Step(feed[:, j:j + 1], torch.tensor([10 + j] * 2), torch.tensor([0, 1])))  # (2, V)
        assert torch.equal(verified[:, j], stepped), f"position {10 + j}"


def test_k_is_checked_against_its_limit_and_the_context():
    check_speculate_k(4, 64)
    for k, context in ((0, 64), (33, 4096), (7, 8)):
        with pytest.raises(ConfigError, match="--speculate-k"):
            check_speculate_k(k, context)


# ----- greedy output: the model's own -----


@pytest.mark.parametrize("kind", ["lookup", "same model", "other model"])
def test_greedy_output_is_plain_greedy_with_every_drafter(tiny_model, other_tiny, kind):
    plain = local_generator(tiny_source(tiny_model))
    gen = local_generator(tiny_source(tiny_model), drafter=drafters(tiny_model, other_tiny)[kind]())
    for text in PROMPTS:
        prompt = plain.encode_prompt(text)
        expected = plain.complete(Turn(prompt, GREEDY))[0].tokens
        got = gen.complete(Turn(prompt, GREEDY))
        assert got[0].tokens == expected, text
    stats = gen.last_stats
    assert stats.verifications > 0 and stats.drafted >= stats.accepted
    if kind == "same model":  # the target's own weights draft: everything is kept
        assert stats.accepted == stats.drafted and stats.tokens_per_verification > 4


@pytest.mark.parametrize("kind", ["lookup", "same model", "other model"])
def test_chat_turns_and_requests_in_flight_give_plain_greedy_text(tiny_model, other_tiny, kind):
    """A chat of three turns (the history reused from the cache row, the draft's row following it), then three
    requests in flight at once in a batch of 3 rows, drafting different amounts."""
    turns = ["hello there", "tell me more about the cat", "and the mat?"]
    outs = []
    for drafter in (None, drafters(tiny_model, other_tiny, max_batch=3)[kind]()):
        gen = local_generator(tiny_source(tiny_model), max_batch=3, drafter=drafter)
        out = []
        gen.write = out.append
        assert gen.run_chat(GenerationArgs(24, temperature=0), scripted_user(turns)) == 3
        requests = [gen.submit(Turn(gen.encode_prompt(text), GREEDY)) for text in PROMPTS[:3]]
        while not all(r.done for r in requests):
            gen.step()
        outs.append(("".join(out), [r.completions[0].tokens for r in requests]))
    assert outs[0] == outs[1]


def test_seeded_sampling_with_a_drafter_is_reproducible(tiny_model, other_tiny):
    gen = local_generator(tiny_source(tiny_model), drafter=drafters(tiny_model, other_tiny)["other model"]())
    prompt = gen.encode_prompt("Once upon a time")
    runs = [gen.complete(Turn(prompt, GenerationArgs(32, temperature=0.9, seed=seed)))[0].tokens
            for seed in (5, 5, 6)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_stats_report_acceptance(tiny_model):
    gen = local_generator(tiny_source(tiny_model), drafter=PromptLookupDrafter(4, 2))
    gen.complete(Turn(gen.encode_prompt("abc abc abc abc abc"), GREEDY))
    s = gen.last_stats
    line = s.summary(gen.device)
    assert f"{s.accepted}/{s.drafted} draft tokens accepted" in line and "tokens per verification" in line
    # every token after the first came from a verification (the prompt's end drafts nothing only if no match)
    assert s.verified_tokens <= s.accepted + s.verifications and s.new_tokens - 1 >= s.verified_tokens
    assert s.tokens_per_verification == pytest.approx(s.verified_tokens / s.verifications)


def test_drafts_never_run_past_max_new_tokens_or_the_context(tiny_model):
    """A context of 40 tokens, k 8: the verification rows are cut so that every position fits, and a sequence ends
    at max_new_tokens exactly, whatever was drafted."""
    plain = local_generator(tiny_source(tiny_model), 40)
    gen = local_generator(tiny_source(tiny_model), 40, drafter=ModelDrafter(8, local_generator(
        tiny_source(tiny_model), 40)))
    prompt = plain.encode_prompt("abc abc abc")
    for new in (1, 2, 9, 40 - len(prompt)):
        args = GenerationArgs(new, temperature=0)
        expected = plain.generate_tokens(Turn(prompt, args))
        assert list(gen.generate_tokens(Turn(prompt, args))) == list(expected)



# ----- the command line -----


def test_generate_with_each_drafter_prints_plain_greedy_text_and_the_acceptance(tiny_model, other_tiny):
    base = ["generate", *tiny_model.cli_flags(), "--prompt", "abc abc abc abc", "--max-new-tokens", "24",
            "--temperature", "0"]
    plain = torchchat(*base)
    assert plain.returncode == 0, plain.stderr
    for flags in (["--prompt-lookup", "2"], ["--draft-quantize", "int8", "--speculate-k", "3"],
                  ["--draft-checkpoint-path", str(other_tiny.checkpoint)]):
        proc = torchchat(*base, *flags)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == plain.stdout, flags
        assert "speculative decoding: " in proc.stderr and "draft tokens accepted" in proc.stderr, proc.stderr


@pytest.mark.parametrize("flags, fragments", [
    (["--speculate-k", "3"], ["--speculate-k needs a drafter", "--prompt-lookup"]),
    (["--speculate-k", "0", "--prompt-lookup", "2"], ["--speculate-k", "0 must be at least 1"]),
    (["--prompt-lookup", "0"], ["--prompt-lookup", "0 must be at least 1"]),
    (["--prompt-lookup", "2", "--draft-quantize", "int4"], ["--prompt-lookup drafts without a model",
                                                            "--draft-quantize"]),
    (["--prompt-lookup", "2", "--speculate-k", "30", "--max-seq-length", "24"],
     ["--speculate-k (30) must be between 1 and 22", "context of 24 tokens"]),
    (["--draft-gguf-path", "SMOLLM2"], ["vocabulary of 49152 tokens", "a draft must share the model's tokenizer"]),
    (["--draft-gguf-path", "/nonexistent.gguf"], ["the draft model: checkpoint not found", "--draft-gguf-path"]),
], ids=lambda v: " ".join(v[:2]) if isinstance(v, list) and v[0].startswith("--") else None)
def test_bad_speculation_flags_are_one_line_before_the_weights_load(tiny_model, request, flags, fragments):
    if "SMOLLM2" in flags:  # the default model (README's install): another vocabulary than the tiny model's
        flags = [str(request.getfixturevalue("smollm2_gguf")) if f == "SMOLLM2" else f for f in flags]
    proc = torchchat("generate", *tiny_model.cli_flags(), "--prompt", "hi", "--max-new-tokens", "4", *flags)
    one_line_error(proc, *fragments)
    assert "loaded" not in proc.stderr


# ----- SmolLM2 -----


def test_smollm2_fp32_greedy_with_its_int4_self_draft_and_prompt_lookup_is_plain_greedy(smollm2_gguf):
    """The real model, fp32, three prompts and a chat of two turns: plain greedy text, token for token, with the
    model's own weights in int4 as the draft (which SmolLM2 keeps ~90% of) and with prompt lookup."""
    import io

    from torchchat.catalog import ModelSource
    from torchchat.chat_format import chat_format_for
    from torchchat.generate.local import LocalGenerator
    from torchchat.tokenizer import load_tokenizer

    source = ModelSource("smollm2-135m", gguf_path=smollm2_gguf)
    tokenizer = load_tokenizer(source)
    chat_format = chat_format_for(tokenizer, source)

    def build(drafter=None, quantize=None):
        return LocalGenerator.from_source(source, tokenizer, chat_format, max_seq_len=256, dtype="fp32",
                                          quantize=quantize, drafter=drafter, out=io.StringIO(), err=io.StringIO())
    prompts = ["The capital of France is", "Once upon a time, in a small village by the sea, there lived",
               "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"]
    turns = ["What is the tallest mountain on Earth?", "And the second tallest?"]
    args = GenerationArgs(40, temperature=0)

    def run(gen):
        texts = [gen.complete(Turn(gen.encode_prompt(p), args))[0].tokens for p in prompts]
        out = []
        gen.write = out.append
        gen.run_chat(args, scripted_user(turns))
        return texts, "".join(out)
    expected = run(build())
    self_draft = build(ModelDrafter(4, build(quantize="int4")))
    assert run(self_draft) == expected
    assert self_draft.last_stats.acceptance_rate > 0.5, self_draft.last_stats
    assert run(build(PromptLookupDrafter(4, 3))) == expected


def test_the_draft_models_cache_rows_follow_a_resize(tiny_model, other_tiny):
    """A request of 3 samples grows the generator's cache rows from 1 to 3, and its draft model's with them: every
    sample (greedy, all alike) is the plain greedy text, its draft rows following its own cache row."""
    plain = local_generator(tiny_source(tiny_model))
    gen = local_generator(tiny_source(tiny_model), drafter=drafters(tiny_model, other_tiny)["same model"]())
    prompt = plain.encode_prompt("Once upon a time")
    expected = plain.complete(Turn(prompt, GREEDY))[0].tokens
    got = gen.complete(Turn(prompt, GenerationArgs(48, temperature=0, num_samples=3)))
    assert [c.tokens for c in got] == [expected] * 3 and gen.max_batch == gen.drafter.gen.max_batch == 3
    assert gen.last_stats.accepted == gen.last_stats.drafted > 0


def test_a_sequence_whose_drafts_are_all_rejected_drafts_less_and_still_gets_plain_greedy_text(tiny_model):
    """A drafter that is always wrong (it proposes a token the greedy text never has there): after each rejected
    draft the sequence pauses drafting for 1, 2, 4, ... 16 decode steps, so 47 decode steps propose far fewer than
    47 x 4 tokens; the text is plain greedy all the same."""
    plain = local_generator(tiny_source(tiny_model))
    prompt = plain.encode_prompt("Once upon a time")
    expected = plain.complete(Turn(prompt, GREEDY))[0].tokens
    wrong_after = {i: t for i, t in enumerate(prompt + expected)}

    class Wrong(Drafter):
        def propose(self, context, slot, most, args, rng):
            return Draft([(wrong_after[len(context)] + 1) % 512] * most)  # never the greedy token there

    gen = local_generator(tiny_source(tiny_model), drafter=Wrong(4))
    assert gen.complete(Turn(prompt, GREEDY))[0].tokens == expected
    stats = gen.last_stats
    assert stats.accepted == 0 and 0 < stats.verifications <= 8, stats  # pauses 1 2 4 8 16 16 ...: at most 8
