"""A backend written by subclassing Generator, exactly as docs/backends.md shows, runs generate and chat."""

import io
import re
from pathlib import Path

import pytest

from tests.generators import load_parts, local_generator, scripted_user, tiny_source
from torchchat.generate.base import GenerationArgs, Generator, Turn

DOC = Path(__file__).resolve().parent.parent / "docs" / "backends.md"


@pytest.fixture(scope="module")
def recompute_cls():
    """The example backend, taken from the docs so the docs cannot rot."""
    code = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)[0]
    namespace: dict = {}
    exec(compile(code, str(DOC), "exec"), namespace)
    cls = namespace["RecomputeGenerator"]
    assert issubclass(cls, Generator)
    return cls


def _recompute(cls, source, max_seq_len=256, max_batch=1):
    model, tokenizer, chat_format = load_parts(source)
    gen = cls(model, tokenizer, chat_format, max_seq_len=max_seq_len, max_batch=max_batch)
    gen.out, gen.err = io.StringIO(), io.StringIO()
    return gen


def test_example_backend_generates_like_local(recompute_cls, tiny_model):
    source = tiny_source(tiny_model)
    args = GenerationArgs(max_new_tokens=12, temperature=0)
    ours = _recompute(recompute_cls, source).run_generate("Once upon a time", args)
    local = local_generator(source).run_generate("Once upon a time", args)
    assert ours[0].tokens == local[0].tokens
    assert len(ours[0].tokens) == 12


def test_example_backend_chats_like_local(recompute_cls, tiny_model):
    source = tiny_source(tiny_model)
    args = GenerationArgs(max_new_tokens=6, temperature=0)
    turns = ["hello there", "and again", "third"]
    ours = _recompute(recompute_cls, source)
    local = local_generator(source)
    assert ours.run_chat(args, scripted_user(turns)) == 3
    assert local.run_chat(args, scripted_user(turns)) == 3
    assert ours.out.getvalue() == local.out.getvalue()
    assert ours.out.getvalue().count("\n") >= 3


def test_example_backend_batches_like_local(recompute_cls, tiny_model):
    """Three requests in flight at once, joining at different steps, through the example backend: each gets the
    tokens LocalGenerator gives it alone (the schedule hands the backend rows at their own positions)."""
    source = tiny_source(tiny_model)
    args = GenerationArgs(max_new_tokens=10, temperature=0)
    ours = _recompute(recompute_cls, source, max_batch=3)
    local = local_generator(source)
    prompts = [ours.encode_prompt(p) for p in ("Once upon a time", "The little dog", "In a big forest there was")]
    requests = [ours.submit(Turn(prompts[0], args))]
    ours.step()
    ours.step()  # the first request decodes when the others join
    requests += [ours.submit(Turn(p, args)) for p in prompts[1:]]
    while ours.scheduler.busy:
        ours.step()
    for request, prompt in zip(requests, prompts):
        assert request.completions[0].tokens == local.complete(Turn(prompt, args))[0].tokens
