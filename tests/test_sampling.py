import pytest
import torch

from torchchat.generate.base import GenerationArgs
from torchchat.generate.sampling import sample
from torchchat.model import ConfigError


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
