"""Stopping the server, and the limit of its queue, on real `torchchat.py server` processes.

SmolLM2-135M-Instruct, not the tiny model: a request must still be generating while the test acts on it
(the tiny model decodes ~700 tokens/s, SmolLM2 ~6-20 on 2 shared cores). One server with `--max-batch 1
--max-queue 1 --shutdown-timeout 4` (one slot: a second request waits for it) answers the queue test, then the
SIGTERM test stops it; the Ctrl-C test has its own.
"""

from __future__ import annotations

import concurrent.futures
import json
import signal
import time
import urllib.request

import pytest

from tests.server_process import ServerProcess, openai_client, port_is_free

openai = pytest.importorskip("openai")

MODEL = "smollm2-135m"
GREEDY = {"temperature": 0}
GRACE_S = 4.0  # --shutdown-timeout of the `limited` server
STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def limited(smollm2_gguf, tmp_path_factory):
    server = ServerProcess(["--max-seq-length", "1024", "--max-batch", "1", "--max-queue", "1",
                            "--shutdown-timeout", str(GRACE_S)],
                           tmp_path_factory.mktemp("limited-server") / "server.log")
    yield server.wait_ready()
    server.stop()


def generating(stream):
    """(the first piece of text, the rest of the chunks), once the worker is generating this stream."""
    chunks = iter(stream)
    while not (text := next(chunks).choices[0].delta.content):  # the first chunk only announces the role
        pass
    return text, chunks


def waiting(server: ServerProcess) -> int:
    """Requests waiting for a free slot, as /health reports them."""
    with urllib.request.urlopen(f"{server.url}/health", timeout=10) as r:
        return json.loads(r.read())["waiting"]


def test_a_full_queue_is_answered_503(limited):
    running = openai_client(limited).chat.completions.create(model=MODEL, messages=STORY, max_tokens=600,
                                                             stream=True, **GREEDY)
    generating(running)  # it holds the one slot for a long while
    question = {"model": MODEL, "messages": QUESTION, "max_tokens": 8, **GREEDY}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        try:
            second = pool.submit(limited.post, "/v1/chat/completions", question)
            deadline = time.monotonic() + 30
            while waiting(limited) < 1:
                assert time.monotonic() < deadline and not second.done(), "the second request never waited"
                time.sleep(0.05)
            status, body = limited.post("/v1/chat/completions", question, timeout=10)  # --max-queue 1: one waits
        finally:
            running.close()  # its client leaves: its slot goes to the waiting request
        assert status == 503, body
        assert body["error"]["code"] == "server_busy" and "--max-queue" in body["error"]["message"]
        status, body = second.result(timeout=60)
        assert status == 200 and "Paris" in body["choices"][0]["message"]["content"]
    assert limited.post("/v1/chat/completions", question)[0] == 200  # room again


def test_sigterm_lets_in_flight_requests_finish_then_cuts_the_rest(limited):
    client = openai_client(limited)
    short = dict(model=MODEL, messages=QUESTION, max_tokens=4, **GREEDY)
    whole = client.chat.completions.create(**short).choices[0].message.content
    first, finishing = generating(client.chat.completions.create(**short, stream=True))
    long = iter(client.chat.completions.create(model=MODEL, messages=STORY, max_tokens=600, stream=True, **GREEDY))
    next(long)  # accepted: it waits behind the short one, then runs until the grace period ends
    t0 = time.monotonic()
    limited.send_signal(signal.SIGTERM)
    assert first + "".join(c.choices[0].delta.content or "" for c in finishing if c.choices) == whole
    finished_s = time.monotonic() - t0
    with pytest.raises(openai.APIError, match="the server is shutting down; the request was cut"):
        for _ in long:
            pass
    cut_s = time.monotonic() - t0
    # The short one (3 tokens left) ended well within the grace; the long one was cut at its end, not before.
    assert finished_s < GRACE_S <= cut_s < GRACE_S + 10, (finished_s, cut_s)
    assert limited.proc.wait(30) == -signal.SIGTERM, limited.log()
    assert time.monotonic() - t0 < GRACE_S + 15
    assert port_is_free(limited.port)
    assert "Application shutdown complete" in limited.log()


def test_ctrl_c_waits_for_in_flight_requests_and_a_second_one_cuts_them(smollm2_gguf, tmp_path):
    server = ServerProcess(["--shutdown-timeout", "60"], tmp_path / "server.log").wait_ready()
    try:
        stream = openai_client(server).chat.completions.create(model=MODEL, messages=STORY, max_tokens=600,
                                                               stream=True, **GREEDY)
        _, chunks = generating(stream)
        server.send_signal(signal.SIGINT)
        for _ in range(5):
            assert next(chunks).choices[0].delta.content is not None  # the first Ctrl-C lets it go on
        t0 = time.monotonic()
        server.send_signal(signal.SIGINT)  # the second one ends the wait
        with pytest.raises(openai.APIError, match="shutting down"):
            for _ in chunks:
                pass
        assert time.monotonic() - t0 < 10
        assert server.proc.wait(30) == 130  # the CLI's exit code for an interrupt
        assert time.monotonic() - t0 < 15
        assert port_is_free(server.port)
    finally:
        server.stop()
