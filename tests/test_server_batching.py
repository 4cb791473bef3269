"""Continuous batching in the server, on real `torchchat.py server` processes: requests join and leave the
running batch, and each one gets the text it gets alone.

The model is the tiny random one with every output row but printable ASCII zeroed (``write_printable_model``):
greedy replies never stop early (a zeroed logit, 0, is never the largest), so streams last as long as a test
needs, and a reply is text that a chat client can send back and the tokenizer encodes to the same tokens (one
byte each), which prefix reuse needs. "Alone" is an in-process LocalGenerator with one cache row on the same
model, each request run by itself.

Two servers: the default --max-batch (8), and one with --max-batch 3 --no-prefix-reuse (slots run out).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from tests.cli_process import one_line_error, torchchat
from tests.generators import local_generator, tiny_source
from tests.model_assets import TinyModel
from tests.server_process import ServerProcess
from tests.server_process import openai_client as client_for
from torchchat.generate.base import GenerationArgs, Turn

openai = pytest.importorskip("openai")

CONTEXT = 2048
LONG = 1000  # tokens of a reply that outlasts what a test does meanwhile (a few ms a step in a batch)
SMALL_BATCH = 3
GREEDY = {"temperature": 0}
PROMPTS = [f"Client {i} asks: {topic}" for i, topic in enumerate(
    ["the history of Rome?", "why is the sky blue", "a poem about the sea, please", "how do bees make honey?",
     "what is a prime number", "tell me a joke about cats", "the capital of Peru", "how tall is Everest?"])]


def write_printable_model(tiny: TinyModel, directory: Path) -> TinyModel:
    """The tiny model whose output rows are zero except printable ASCII without space (bytes 33..126): a greedy
    reply is such text and never stops (see the module docstring)."""
    directory.mkdir(parents=True, exist_ok=True)
    state = torch.load(tiny.checkpoint)
    printable = torch.zeros(state["output.weight"].size(0), dtype=torch.bool)
    printable[33:127] = True
    state["output.weight"][~printable] = 0
    torch.save(state, directory / "model.pth")
    params = json.loads((tiny.checkpoint.parent / "params.json").read_text())
    (directory / "params.json").write_text(json.dumps({**params, "max_seq_len": CONTEXT}))
    return TinyModel(directory / "model.pth", tiny.tokenizer, tiny.args)


@pytest.fixture(scope="module")
def printable(tiny_model, tmp_path_factory) -> TinyModel:
    return write_printable_model(tiny_model, tmp_path_factory.mktemp("printable"))


@pytest.fixture(scope="module")
def alone(printable):
    """alone(prompt, max_tokens, **sampling) -> the Completion an in-process generator gives the request alone."""
    gen = local_generator(tiny_source(printable), max_seq_len=CONTEXT)

    def run(prompt: str, max_tokens: int, temperature: float = 0.0, seed: int | None = None):
        args = GenerationArgs(max_new_tokens=max_tokens, temperature=temperature, seed=seed)  # the server's defaults
        return gen.complete(Turn(gen.encode_prompt(prompt), args))[0]
    return run


@pytest.fixture(scope="module")
def server(printable, tmp_path_factory):
    server = ServerProcess([*printable.cli_flags(), "--max-seq-length", str(CONTEXT), "--max-new-tokens", "16"],
                           tmp_path_factory.mktemp("batching") / "server.log").wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def small(printable, tmp_path_factory):
    server = ServerProcess([*printable.cli_flags(), "--max-seq-length", str(CONTEXT), "--max-new-tokens", "16",
                            "--max-batch", str(SMALL_BATCH), "--no-prefix-reuse"],
                           tmp_path_factory.mktemp("batching-small") / "server.log").wait_ready()
    yield server
    server.stop()


def health(server: ServerProcess) -> dict:
    with urllib.request.urlopen(f"{server.url}/health", timeout=10) as r:
        return json.loads(r.read())


def wait_for(condition, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout:.0f} s for {what}"
        time.sleep(0.02)


class Stream(threading.Thread):
    """A streamed completion read on its own thread: the arrival time of each piece of text, the text of each
    choice, the usage."""

    def __init__(self, server: ServerProcess, prompt: str, max_tokens: int, **kwargs):
        super().__init__(daemon=True)
        self.client = client_for(server)
        self.kwargs = dict(model="model", prompt=prompt, max_tokens=max_tokens, stream=True,
                           stream_options={"include_usage": True}, **{**GREEDY, **kwargs})
        self.times: list[float] = []
        self.texts: dict[int, str] = defaultdict(str)
        self.pieces: dict[int, int] = defaultdict(int)  # chunks of text, by choice
        self.usage = None
        self.error: Exception | None = None
        self.streaming = threading.Event()  # set at the first piece of text (or the end)

    def run(self):
        try:
            for chunk in self.client.completions.create(**self.kwargs):
                self.usage = chunk.usage or self.usage
                for c in chunk.choices:
                    if c.text:
                        self.times.append(time.monotonic())
                        self.texts[c.index] += c.text
                        self.pieces[c.index] += 1
                        self.streaming.set()
        except Exception as e:  # noqa: BLE001 - raised in the test by result()
            self.error = e
        finally:
            self.streaming.set()

    def begin(self) -> "Stream":
        """Start it and wait until its text flows (its request is in the batch)."""
        self.start()
        return self.flowing()

    def flowing(self) -> "Stream":
        assert self.streaming.wait(60), "no text within 60 s"
        return self

    def result(self, timeout: float = 120.0) -> "Stream":
        self.join(timeout)
        assert not self.is_alive(), f"still streaming after {timeout:.0f} s"
        if self.error is not None:
            raise self.error
        return self

    @property
    def text(self) -> str:
        return self.texts[0]

    @property
    def first(self) -> float:
        return self.times[0]

    @property
    def last(self) -> float:
        return self.times[-1]


class Leaver:
    """A streamed completion over a raw connection that the test closes mid-stream (a client going away)."""

    def __init__(self, server: ServerProcess, prompt: str, max_tokens: int):
        body = json.dumps({"model": "model", "prompt": prompt, "max_tokens": max_tokens, "stream": True, **GREEDY})
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        self.conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        self.response = self.conn.getresponse()
        assert self.response.status == 200
        for _ in range(3):  # a few pieces of text: its request is in the batch
            assert self.response.readline().startswith(b"data: ")
            self.response.readline()

    def leave(self):
        self.conn.close()


# ----- requests join and leave the batch; each gets its text alone -----

def test_eight_concurrent_clients_each_get_the_text_they_get_alone(server, alone):
    streams = [Stream(server, prompt, 200) for prompt in PROMPTS]
    for s in streams:
        s.start()
    for s in streams:
        s.result()
    for prompt, s in zip(PROMPTS, streams):
        expected = alone(prompt, 200)
        assert s.text == expected.text, prompt
        assert s.usage.completion_tokens == len(expected.tokens) == 200
    # They ran side by side: every stream's text was still flowing when the last one's began.
    assert max(s.first for s in streams) < min(s.last for s in streams)


def test_a_request_joining_running_streams_gets_its_text_alone(server, alone):
    long_prompts = PROMPTS[:3]
    running = [Stream(server, prompt, LONG) for prompt in long_prompts]
    # A prompt longer than one prefill chunk (256 tokens): it is fed over two steps while the others decode.
    prompt = "Read this and go on: " + "".join(chr(33 + i % 94) for i in range(300))
    joining = Stream(server, prompt, 32)  # its client built before the others start: it joins at once
    for s in running:
        s.start()
    for s in running:
        s.flowing()
    joining.begin().result()
    for s in running:
        s.result()
    assert joining.text == alone(prompt, 32).text
    for prompt, s in zip(long_prompts, running):
        assert s.text == alone(prompt, LONG).text, prompt
    # It joined while the others decoded, and left before them.
    assert max(s.first for s in running) < joining.first and joining.last < min(s.last for s in running)


def test_a_client_leaving_frees_its_slot_and_disturbs_nobody(small, alone):
    before = small.log().count("request cancelled")
    staying = [Stream(small, prompt, LONG) for prompt in PROMPTS[:2]]
    waiting = Stream(small, PROMPTS[3], 16)
    for s in staying:
        s.start()
    for s in staying:
        s.flowing()
    leaver = Leaver(small, PROMPTS[2], LONG)
    assert health(small)["running"] == SMALL_BATCH  # every slot taken
    waiting.start()
    wait_for(lambda: health(small)["waiting"] == 1, "the fourth request to wait for a slot")
    assert not waiting.times
    leaver.leave()
    waiting.result()  # it took the slot the leaver freed ...
    state = health(small)
    assert all(s.is_alive() for s in staying)  # ... while the others went on
    assert state["waiting"] == 0 and state["running"] == 2, state
    for s in staying:
        s.result()
    assert waiting.last < min(s.last for s in staying)
    assert waiting.text == alone(PROMPTS[3], 16).text
    for prompt, s in zip(PROMPTS[:2], staying):
        assert s.text == alone(prompt, LONG).text, prompt
    assert small.log().count("request cancelled") == before + 1


# ----- n samples are n sequences of the batch -----

def test_n_samples_with_a_seed_are_sequences_of_the_batch(server, alone):
    client = client_for(server)
    kwargs = dict(model="model", prompt=PROMPTS[4], max_tokens=24, temperature=1.0, seed=7)
    three = client.completions.create(n=3, **kwargs)
    one = client.completions.create(**kwargs)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert len({c.text for c in three.choices}) == 3  # three samples, not one thrice
    assert three.choices[0].text == one.choices[0].text == alone(PROMPTS[4], 24, 1.0, seed=7).text
    streamed = Stream(server, PROMPTS[4], 24, n=3, temperature=1.0, seed=7).begin().result()
    assert streamed.texts == {c.index: c.text for c in three.choices}
    assert all(streamed.pieces[i] > 1 for i in range(3)), streamed.pieces  # every choice streams as it goes


def test_n_beyond_max_batch_is_400_naming_the_flag(small):
    with pytest.raises(openai.BadRequestError) as e:
        client_for(small).completions.create(model="model", prompt="Hi", max_tokens=2, n=SMALL_BATCH + 1)
    assert e.value.param == "n" and "--max-batch" in e.value.message


def test_max_batch_is_validated_before_loading(tmp_path):
    missing = tmp_path / "nothing.pth"
    one_line_error(torchchat("server", "--checkpoint-path", str(missing), "--max-batch", "0"),
                   "--max-batch", "0 must be at least 1")


# ----- prefix reuse: the next turn of a chat feeds only its new tokens -----

def next_turn(client, max_tokens: int = 24):
    """A conversation's first turn and the next one, which sends it back with a new user message."""
    first_messages = [{"role": "user", "content": "Tell me about the history of Rome."}]
    first = client.chat.completions.create(model="model", messages=first_messages, max_tokens=max_tokens, **GREEDY)
    messages = [*first_messages, {"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "And then?"}]
    second = client.chat.completions.create(model="model", messages=messages, max_tokens=max_tokens, **GREEDY)
    return first, second


def test_the_next_turn_of_a_chat_reuses_its_cache_row(server, small):
    first, second = next_turn(client_for(server))
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    # The row holds the first prompt and the reply but its last token (sampled, never fed).
    held = first.usage.prompt_tokens + first.usage.completion_tokens - 1
    assert second.usage.prompt_tokens_details.cached_tokens == held < second.usage.prompt_tokens
    assert second.choices[0].finish_reason == "length" and second.usage.completion_tokens == 24
    assert len(second.choices[0].message.content) == 24  # a whole reply (one printable character a token)
    # --no-prefix-reuse feeds the whole conversation again.
    first, second = next_turn(client_for(small))
    assert second.usage.prompt_tokens_details.cached_tokens == 0 and second.usage.completion_tokens == 24


# ----- a step that fails fails every request in it; the server serves on -----

def test_a_failing_step_answers_every_request_in_it_and_the_engine_serves_on(printable):
    from torchchat.server.engine import Engine
    from torchchat.server.responses import api_error

    gen = local_generator(tiny_source(printable), max_seq_len=256, max_batch=4)
    forward, steps = gen.forward, [0]

    def failing_once(step):
        steps[0] += 1
        if steps[0] == 5:  # both prompts are in, both decode
            raise RuntimeError("a forward failed")
        return forward(step)
    gen.forward = failing_once

    def turn(prompt: str) -> Turn:
        return Turn(gen.encode_prompt(prompt), GenerationArgs(max_new_tokens=50, temperature=0))

    async def serve():
        engine = Engine(gen)
        engine.start()
        try:
            first, second = engine.submit(turn(PROMPTS[0])), engine.submit(turn(PROMPTS[1]))
            failed = await asyncio.wait_for(asyncio.gather(first.result(), second.result(), return_exceptions=True),
                                            60)
            after = await asyncio.wait_for(engine.submit(turn(PROMPTS[2])).result(), 60)
        finally:
            await asyncio.to_thread(engine.stop)
        return failed, after

    failed, after = asyncio.run(serve())
    assert all(isinstance(e, RuntimeError) for e in failed), failed  # both were in the failed step
    assert [api_error(e).status for e in failed] == [500, 500]
    assert after[0].tokens == gen.complete(turn(PROMPTS[2]))[0].tokens  # and right


def test_a_speculating_server_gives_concurrent_clients_their_plain_greedy_text(printable, alone, tmp_path):
    """`server --prompt-lookup 2 --max-batch 3`: three streams at once, each verification step batching their
    drafts (of different lengths), a fourth waiting for a slot; each gets the text it gets alone without drafting."""
    spec = ServerProcess([*printable.cli_flags(), "--max-seq-length", "512", "--max-batch", str(SMALL_BATCH),
                          "--prompt-lookup", "2"], tmp_path / "server.log").wait_ready()
    try:
        streams = [Stream(spec, prompt, 120) for prompt in PROMPTS[:4]]
        for s in streams:
            s.start()
        for s in streams:
            s.result()
        for prompt, s in zip(PROMPTS, streams):
            assert s.text == alone(prompt, 120).text, prompt
        assert "speculative decoding: prompt lookup (2-grams), k 4" in spec.log()
    finally:
        spec.stop()
    assert "draft tokens accepted" in spec.log()
