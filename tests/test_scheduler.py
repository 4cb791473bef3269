"""Continuous batching on one process (LocalGenerator, the tiny model, float32 on CPU): requests join and leave
between steps, each in its own KV cache row at its own position, and each gets the tokens it gets alone."""

import pytest
import torch

from tests.generators import local_generator, tiny_source
from torchchat.generate.base import GenerationArgs, Turn

PROMPTS = ["Once upon a time", "The little dog ran", "In a big forest there was", "Tom and Lily went to",
           "She had a red ball", "One day, a bird", "The sun was hot and", "Mom said to"]
GREEDY = dict(temperature=0, top_k=None)


@pytest.fixture(scope="module")
def alone(tiny_model):
    """Each prompt's greedy tokens (24 of them), run alone on a fresh batch-1 generator."""
    gen = local_generator(tiny_source(tiny_model))
    args = GenerationArgs(max_new_tokens=24, **GREEDY)
    return {p: gen.complete(Turn(gen.encode_prompt(p), args))[0].tokens for p in PROMPTS}


def drain(gen, max_steps: int = 500):
    """Step until every request ended; fails (rather than hangs) when the schedule stops making progress."""
    for _ in range(max_steps):
        if not gen.scheduler.busy:
            return
        gen.step()
    raise AssertionError(f"requests still running after {max_steps} steps: {gen.scheduler.running}")


def test_requests_joining_at_different_steps_get_their_tokens_alone(tiny_model, alone):
    """Eight requests, four cache rows: two join at once, the others every few steps and, beyond the rows, wait
    for a row to free up; rows then decode at different positions in one step. Every request gets exactly the
    tokens it gets alone."""
    gen = local_generator(tiny_source(tiny_model), max_batch=4)
    args = GenerationArgs(max_new_tokens=24, **GREEDY)
    batches = []
    forward = gen.forward
    gen.forward = lambda step: batches.append(step.tokens.shape) or forward(step)
    requests = {}
    for i, prompt in enumerate(PROMPTS):
        requests[prompt] = gen.submit(Turn(gen.encode_prompt(prompt), args))
        if i % 2:
            for _ in range(3):
                gen.step()
    drain(gen)
    for prompt, request in requests.items():
        assert request.completions[0].tokens == alone[prompt], prompt
    assert max(b for b, t in batches if t == 1) == 4  # decode steps of four rows: the batch was full
    assert all(slot.sequence is None for slot in gen.scheduler.slots)


def test_a_seeded_request_samples_the_same_text_whatever_runs_beside_it(tiny_model):
    gen = local_generator(tiny_source(tiny_model), max_batch=3)
    sampled = GenerationArgs(max_new_tokens=16, temperature=1.0, top_k=50, seed=1234)
    prompt = gen.encode_prompt("Once upon a time")
    alone_tokens = gen.complete(Turn(prompt, sampled))[0].tokens
    others = [gen.submit(Turn(gen.encode_prompt(p), GenerationArgs(max_new_tokens=16, temperature=1.0, seed=s)))
              for p, s in (("The little dog ran", 1), ("Mom said to", None))]
    gen.step()
    request = gen.submit(Turn(prompt, sampled))
    drain(gen)
    assert request.completions[0].tokens == alone_tokens
    assert all(o.completions for o in others)
    other_seed = gen.complete(Turn(prompt, GenerationArgs(max_new_tokens=16, temperature=1.0, top_k=50, seed=99)))
    assert other_seed[0].tokens != alone_tokens  # the seed matters: the comparison above can fail


def test_samples_of_one_prompt_are_rows_of_one_batch_and_sample_0_keeps_the_seed(tiny_model):
    gen = local_generator(tiny_source(tiny_model))
    prompt = gen.encode_prompt("The little dog ran")
    args = GenerationArgs(max_new_tokens=12, temperature=1.0, seed=7)
    one = gen.complete(Turn(prompt, args))[0].tokens
    three = gen.complete(Turn(prompt, GenerationArgs(max_new_tokens=12, temperature=1.0, seed=7, num_samples=3)))
    assert gen.max_batch == 3  # the generator grew its rows for the request
    assert three[0].tokens == one
    assert len({tuple(c.tokens) for c in three}) == 3  # each sample draws from its own generator


def test_a_long_prompt_is_fed_in_chunks_while_the_others_decode(tiny_model, alone):
    """prefill_chunk 8: a 60-token prompt takes 8 steps; the request already decoding gets one token in each."""
    gen = local_generator(tiny_source(tiny_model), max_batch=2, prefill_chunk=8)
    args = GenerationArgs(max_new_tokens=24, **GREEDY)
    running = gen.submit(Turn(gen.encode_prompt(PROMPTS[0]), args))
    while not running.sequences[0].generated:
        gen.step()
    long_prompt = gen.encode_prompt(" ".join(PROMPTS * 2))[:60]
    assert len(long_prompt) == 60
    joining = gen.submit(Turn(long_prompt, GenerationArgs(max_new_tokens=4, **GREEDY)))
    widths = []
    forward = gen.forward
    gen.forward = lambda step: widths.append(step.tokens.size(1)) or forward(step)
    before = len(running.sequences[0].generated)
    for _ in range(8):
        gen.step()
    assert [w for w in widths if w > 1] == [8] * 7 + [4]  # the prompt's chunks, one a step
    assert len(running.sequences[0].generated) == before + 8
    assert joining.sequences[0].generated  # its last chunk gave its first token
    drain(gen)
    assert running.completions[0].tokens == alone[PROMPTS[0]]
    chunked = joining.completions[0].tokens
    whole = local_generator(tiny_source(tiny_model)).complete(Turn(long_prompt, GenerationArgs(max_new_tokens=4,
                                                                                                **GREEDY)))
    assert chunked == whole[0].tokens


def test_a_cancelled_request_frees_its_row_at_once_and_disturbs_nobody(tiny_model, alone):
    gen = local_generator(tiny_source(tiny_model), max_batch=2)
    args = GenerationArgs(max_new_tokens=24, **GREEDY)
    keep = gen.submit(Turn(gen.encode_prompt(PROMPTS[0]), args))
    cut = gen.submit(Turn(gen.encode_prompt(PROMPTS[1]), args))
    waiting = gen.submit(Turn(gen.encode_prompt(PROMPTS[2]), args))
    for _ in range(5):
        gen.step()
    assert waiting in gen.scheduler.waiting  # both rows taken
    gen.cancel(cut, ConnectionResetError("client gone"))
    assert isinstance(cut.error, ConnectionResetError) and cut.completions is None
    gen.step()
    assert waiting in gen.scheduler.running  # it took the freed row in the next step
    drain(gen)
    assert keep.completions[0].tokens == alone[PROMPTS[0]]
    assert waiting.completions[0].tokens == alone[PROMPTS[2]]


def test_a_conversation_that_goes_on_reuses_its_row(tiny_model):
    """The next turn of a chat (its history plus a new message) is fed only its new tokens; a different
    conversation, even one sharing the first tokens, is fed from position 0 (its tokens must not depend on
    what ran before it)."""
    gen = local_generator(tiny_source(tiny_model), max_batch=2)
    args = GenerationArgs(max_new_tokens=10, **GREEDY)
    first = gen.encode_prompt("Once upon a time")
    reply = gen.complete(Turn(first, args))[0].tokens
    history = first + reply + gen.encode_prompt(" and then")[1:]
    fed = []
    forward = gen.forward
    gen.forward = lambda step: fed.append(step.tokens.size(1)) or forward(step)
    follow_up = gen.submit(Turn(history, args))
    drain(gen)
    stats = follow_up.stats  # what chat prints: the tokens fed, and those found in the row
    assert stats.cached_tokens == len(first) + len(reply) - 1  # the reply's last token was never fed
    assert fed[0] == len(history) - stats.cached_tokens == stats.prompt_tokens
    assert f"prefill {fed[0]} tokens (+{stats.cached_tokens} cached)" in stats.summary(gen.device)
    other = gen.submit(Turn(first[:3] + gen.encode_prompt(" the cat")[1:], args))
    drain(gen)
    assert other.stats.cached_tokens == 0
    assert other.completions[0].tokens == local_generator(tiny_source(tiny_model)).complete(other.turn)[0].tokens


def test_a_failing_step_fails_every_request_in_it_and_the_generator_goes_on(tiny_model, alone):
    gen = local_generator(tiny_source(tiny_model), max_batch=2)
    args = GenerationArgs(max_new_tokens=24, **GREEDY)
    requests = [gen.submit(Turn(gen.encode_prompt(p), args)) for p in PROMPTS[:2]]
    gen.step()
    forward = gen.forward
    gen.forward = lambda step: (_ for _ in ()).throw(RuntimeError("out of memory"))
    with pytest.raises(RuntimeError, match="out of memory"):
        gen.step()
    assert all(isinstance(r.error, RuntimeError) for r in requests) and not gen.scheduler.busy
    gen.forward = forward
    again = gen.complete(Turn(gen.encode_prompt(PROMPTS[0]), args))
    assert again[0].tokens == alone[PROMPTS[0]]


def test_model_rows_at_their_own_positions_equal_each_row_alone(tiny_model):
    """The model itself: a decode step of three rows, in scrambled cache rows and at different positions, gives
    each row the logits of that row run alone (float32, the plain modules; torch's matmul on three rows may round
    otherwise than on one: within 1e-5 of the largest logit)."""
    gen = local_generator(tiny_source(tiny_model), max_batch=4)
    model = gen.model
    prompts = [gen.encode_prompt(p) for p in PROMPTS[:3]]
    slots = [2, 0, 3]
    with torch.no_grad():
        for tokens, slot in zip(prompts, slots):
            model(torch.tensor([tokens]), torch.arange(len(tokens)), torch.tensor([slot]))
        step = torch.tensor([[5], [6], [7]])
        positions = torch.tensor([[len(p)] for p in prompts])  # (3, 1)
        together = model(step, positions, torch.tensor(slots))[:, -1]  # (3, V)
        one_by_one = torch.cat([model(step[i:i + 1], positions[i], torch.tensor([slots[i]]))[:, -1]
                                for i in range(3)])
    scale = one_by_one.abs().max().item()
    torch.testing.assert_close(together, one_by_one, rtol=0, atol=1e-5 * scale)
