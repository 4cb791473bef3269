import pytest
import torch

from torchchat.generate.base import GenerationArgs
from torchchat.generate.sampling import sample
from torchchat.errors import ConfigError


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 1.0, 4.9]])
    assert sample(logits, 0.0, None, 1.0).tolist() == [1, 0]


def test_top_k_1_is_greedy_at_any_temperature():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        assert torch.equal(sample(logits, 5.0, 1, 1.0, gen), logits.argmax(-1))


def test_top_p_keeps_only_the_nucleus():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.7 keeps the first two tokens only
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    gen = torch.Generator().manual_seed(0)
    seen = {sample(probs.log(), 1.0, None, 0.7, gen).item() for _ in range(300)}
    assert seen == {0, 1}


def test_temperature_sampling_follows_the_distribution():
    probs = torch.tensor([[0.7, 0.2, 0.1]])
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(probs.log(), 1.0, None, 1.0, gen) for _ in range(3000)])
    freq = torch.bincount(draws.flatten(), minlength=3).float() / draws.numel()
    assert torch.allclose(freq, probs[0], atol=0.03)


def draw_frequencies(logits: torch.Tensor, temperature: float, top_k: int | None, n: int = 20_000):
    """Token frequencies of n draws from one row of logits (one batched call of n rows), seeded."""
    gen = torch.Generator().manual_seed(0)
    draws = sample(logits.expand(n, -1), temperature, top_k, 1.0, gen)  # (n,)
    return torch.bincount(draws, minlength=logits.numel()).float() / n


def binomial_sigma(p: torch.Tensor, n: int = 20_000) -> torch.Tensor:
    """One standard deviation of the frequency of an outcome of probability p in n draws."""
    return (p * (1 - p) / n).sqrt()


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sampling_follows_softmax_of_logits_over_temperature(temperature):
    # At T = 0.5 the expected frequencies are 0.685 0.247 0.062 0.007, at T = 2 0.379 0.294 0.208 0.120,
    # against 0.5 0.3 0.15 0.05 at T = 1: a sampler that ignored T would be off by 20-60 sigma. Measured
    # with this seed: at most 2.3 sigma (T = 0.5) and 1.2 sigma (T = 2); the bound is 4 sigma.
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    expected = torch.softmax(logits / temperature, dim=-1)
    freq = draw_frequencies(logits, temperature, None)
    assert ((freq - expected).abs() <= 4 * binomial_sigma(expected)).all(), (freq, expected)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_top_k_keeps_the_k_largest_in_proportion(temperature):
    # The three largest logits are 2.0, 1.0, 0.5 (tokens 0, 2, 3); the others are never drawn, and the
    # three are drawn as softmax over them alone. Measured with this seed: at most 1.9 sigma; bound 4 sigma.
    logits = torch.tensor([2.0, -1.0, 1.0, 0.5, -3.0, 0.0])
    top3 = torch.tensor([True, False, True, True, False, False])
    expected = torch.softmax(logits.masked_fill(~top3, float("-inf")) / temperature, dim=-1)
    freq = draw_frequencies(logits, temperature, 3)
    assert (freq[~top3] == 0).all(), freq
    assert ((freq - expected).abs()[top3] <= 4 * binomial_sigma(expected[top3])).all(), (freq, expected)


def test_seed_makes_sampling_reproducible():
    logits = torch.randn(2, 100)
    a = [sample(logits, 1.0, 50, 0.9, torch.Generator().manual_seed(7)).tolist() for _ in range(3)]
    assert a[0] == a[1] == a[2]


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1), "--temperature (-1) must be >= 0"),
    (dict(top_p=0), "--top-p (0) must be in (0, 1]"),
    (dict(top_p=1.5), "--top-p (1.5) must be in (0, 1]"),
    (dict(top_k=0), "--top-k (0) must be at least 1"),
    (dict(max_new_tokens=0), "--max-new-tokens (0) must be at least 1"),
    (dict(num_samples=0), "--num-samples (0) must be at least 1"),
])
def test_impossible_values_are_rejected(kwargs, message):
    with pytest.raises(ConfigError) as e:
        GenerationArgs(**kwargs)
    assert message in str(e.value)
