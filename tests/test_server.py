"""The OpenAI-compatible server as users meet it: real `torchchat.py server` processes driven by the
official `openai` client (and raw HTTP for what that client would never send).

Two servers per module: a tiny random model (protocol, errors, sampling; fast) and the default
SmolLM2-135M-Instruct (answers that must be right, concurrency, stop strings, disconnects); then the
distributed servers, compared with the tiny one. Shutdown and the queue's limit: test_server_shutdown.py.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import re
import signal
import sys
import time

import pytest

from tests.server_process import ROOT, ServerProcess, port_is_free
from tests.server_process import openai_client as client_for

openai = pytest.importorskip("openai")

TINY_CONTEXT = 128
GREEDY = {"temperature": 0}

# Questions SmolLM2-135M-Instruct answers correctly at temperature 0 (checked by hand, then kept here).
# (Italy is not one: "Il Coriobella, Italy.")
CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Germany": "Berlin", "Egypt": "Cairo"}


def ask(country: str) -> list[dict]:
    return [{"role": "user", "content": f"What is the capital of {country}?"}]


@pytest.fixture(scope="module")
def tiny_server(tiny_model, tmp_path_factory):
    server = ServerProcess([*tiny_model.cli_flags(), "--max-seq-length", str(TINY_CONTEXT), "--max-new-tokens", "8"],
                           tmp_path_factory.mktemp("tiny-server") / "server.log").wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tiny(tiny_server):
    return client_for(tiny_server, timeout=60)


@pytest.fixture(scope="module")
def smol_server(smollm2_gguf, tmp_path_factory):
    server = ServerProcess(["--max-seq-length", "1024"], tmp_path_factory.mktemp("smol-server") / "server.log")
    yield server.wait_ready()
    server.stop()


@pytest.fixture(scope="module")
def smol(smol_server):
    return client_for(smol_server)


# ----- holding back a possible stop string while streaming (no process) -----

@pytest.mark.parametrize("text, stops", [
    ("1, 2, 3, 4, 5, 6", (", 5",)),
    ("1, 2, 3, 4, 5, 6", ("7", ", 5")),
    ("aaab", ("aab",)),
    ("no stop here", ("xyz",)),
    ("ends with a partial st", ("stop",)),
])
def test_stream_holdback_never_sends_part_of_a_stop_string(text, stops):
    import random

    from torchchat.server.responses import StopHoldBack

    cut = min((text.find(s) for s in stops if s in text), default=len(text))
    final = text[:cut]  # what the generator returns: the text before the first stop string
    rng = random.Random(0)
    for _ in range(50):
        hold, sent, i = StopHoldBack(stops), "", 0
        while i < len(text):
            j = i + rng.randint(1, 4)
            sent += hold.push(text[i:j])
            assert final.startswith(sent)  # never a character beyond the stop
            i = j
        assert sent + hold.finish(final) == final


# ----- protocol, on the tiny model -----

def test_models_lists_the_served_model(tiny):
    assert [m.id for m in tiny.models.list()] == ["model"]
    assert tiny.models.retrieve("model").id == "model"


def test_chat_completion_has_openai_shape_and_usage(tiny):
    r = tiny.chat.completions.create(model="model", messages=ask("France"), max_tokens=5, **GREEDY)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "model"
    (choice,) = r.choices
    assert choice.index == 0 and choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 10
    assert 1 <= r.usage.completion_tokens <= 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if choice.finish_reason == "length":
        assert r.usage.completion_tokens == 5


def test_stream_sends_the_same_text_and_usage(tiny):
    plain = tiny.chat.completions.create(model="model", messages=ask("Italy"), max_tokens=12, **GREEDY)
    chunks = list(tiny.chat.completions.create(model="model", messages=ask("Italy"), max_tokens=12, stream=True,
                                               stream_options={"include_usage": True}, **GREEDY))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == plain.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_default_max_tokens_is_the_servers_flag(tiny):
    r = tiny.chat.completions.create(model="model", messages=ask("Japan"), **GREEDY)
    assert r.usage.completion_tokens <= 8  # --max-new-tokens 8


def test_max_completion_tokens_is_honoured(tiny):
    r = tiny.chat.completions.create(model="model", messages=ask("Japan"), max_completion_tokens=3, **GREEDY)
    assert r.usage.completion_tokens <= 3


def test_completions_endpoint_text_and_token_prompts(tiny, tiny_model):
    from torchchat.tokenizer import load_tokenizer_file

    r = tiny.completions.create(model="model", prompt="Once upon a time", max_tokens=6, **GREEDY)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    ids = load_tokenizer_file(tiny_model.tokenizer).encode("Once upon a time", bos=True)
    assert r.usage.prompt_tokens == len(ids) == 1 + len("Once upon a time")  # BOS, then one token per byte
    same = tiny.completions.create(model="model", prompt=ids, max_tokens=6, **GREEDY)
    assert same.choices[0].text == r.choices[0].text
    streamed = tiny.completions.create(model="model", prompt="Once upon a time", max_tokens=6, stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == r.choices[0].text


def test_a_prompt_may_be_a_list_of_one_prompt(tiny, tiny_model):
    from torchchat.tokenizer import load_tokenizer_file

    def answer(prompt) -> tuple[str, int]:
        r = tiny.completions.create(model="model", prompt=prompt, max_tokens=6, **GREEDY)
        return r.choices[0].text, r.usage.prompt_tokens

    ids = load_tokenizer_file(tiny_model.tokenizer).encode("Once upon a time", bos=True)
    assert answer(["Once upon a time"]) == answer([ids]) == answer("Once upon a time")
    assert answer("Once upon a time") != answer("Once upon a")  # the prompt counts: the comparison can fail
    with pytest.raises(openai.BadRequestError) as e:
        tiny.completions.create(model="model", prompt=["Once upon a time", "Long ago"], max_tokens=2)
    assert e.value.param == "prompt" and "one prompt per request" in e.value.message


def test_n_samples_are_batched_and_streamed_by_index(tiny):
    kwargs = dict(model="model", prompt="Once upon a time", max_tokens=6, n=2, temperature=1.0, seed=11)
    r = tiny.completions.create(**kwargs)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage.completion_tokens == 2 * 6 or any(c.finish_reason == "stop" for c in r.choices)
    texts = {0: "", 1: ""}
    for chunk in tiny.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == {0: r.choices[0].text, 1: r.choices[1].text}
    assert texts[0] != texts[1]  # two samples, not one twice
    chat = tiny.chat.completions.create(model="model", messages=ask("France"), max_tokens=4, n=3, temperature=1.0,
                                        seed=11)
    assert [c.index for c in chat.choices] == [0, 1, 2]
    assert len({c.message.content for c in chat.choices}) == 3


def text_of(response) -> str:
    return response.choices[0].text


def test_seed_makes_a_request_reproducible(tiny):
    kwargs = dict(model="model", prompt="Once upon a time", max_tokens=10, temperature=1.0, top_p=0.9, seed=5)
    assert text_of(tiny.completions.create(**kwargs)) == text_of(tiny.completions.create(**kwargs))


# The tiny random model spreads its probability over many tokens: at temperature 1 no 10-token sample of
# these seeds equals another or the greedy text (the seeds are fixed, so this holds on every run).
SAMPLED = dict(model="model", prompt="Once upon a time", max_tokens=10)


def test_sampled_texts_differ_from_greedy_and_across_seeds(tiny):
    greedy = text_of(tiny.completions.create(**SAMPLED, **GREEDY))
    sampled = [text_of(tiny.completions.create(**SAMPLED, temperature=1.0, seed=seed)) for seed in (1, 2, 3)]
    assert greedy not in sampled and len(set(sampled)) == 3, (greedy, sampled)
    # The temperature of the request is the one used: the same seed at another temperature samples otherwise.
    assert text_of(tiny.completions.create(**SAMPLED, temperature=0.5, seed=1)) != sampled[0]
    # A streamed chat samples too, as its plain twin does.
    kwargs = dict(model="model", messages=ask("France"), max_tokens=8, temperature=1.0, seed=3)
    plain = tiny.chat.completions.create(**kwargs).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in tiny.chat.completions.create(**kwargs, stream=True)
                       if c.choices)
    assert streamed == plain != tiny.chat.completions.create(**{**kwargs, **GREEDY}).choices[0].message.content


def test_top_k_is_honoured(tiny):
    greedy = text_of(tiny.completions.create(**SAMPLED, **GREEDY))
    for seed in (1, 2):
        hot = dict(temperature=2.0, seed=seed)
        assert text_of(tiny.completions.create(**SAMPLED, **hot)) != greedy  # the server's default top_k (200)
        assert text_of(tiny.completions.create(**SAMPLED, **hot, extra_body={"top_k": 1})) == greedy


def test_model_aliases_are_accepted_and_unknown_models_are_404(tiny):
    with pytest.raises(openai.NotFoundError) as e:
        tiny.chat.completions.create(model="gpt-4o", messages=ask("France"))
    assert e.value.code == "model_not_found" and e.value.param == "model" and "gpt-4o" in e.value.message


# ----- bad input: an OpenAI-style 400, and the server keeps serving -----

def error_of(status_and_body: tuple[int, dict], status: int = 400) -> dict:
    code, body = status_and_body
    assert code == status, body
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_malformed_json_is_400(tiny_server):
    err = error_of(tiny_server.post("/v1/chat/completions", b'{"messages": [}'))
    assert "not valid JSON" in err["message"]
    assert "JSON object" in error_of(tiny_server.post("/v1/chat/completions", b"[1, 2]"))["message"]


def test_missing_messages_is_400_naming_it(tiny_server):
    err = error_of(tiny_server.post("/v1/chat/completions", {"model": "model"}))
    assert err["param"] == "messages" and "messages" in err["message"]
    err = error_of(tiny_server.post("/v1/completions", {"model": "model"}))
    assert err["param"] == "prompt"


@pytest.mark.parametrize("extra, param", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"logprobs": True}, "logprobs"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": 1.0}, "frequency_penalty"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"logit_bias": {"42": 10}}, "logit_bias"),
    ({"temprature": 0.5}, "temprature"),  # a typo is not silently ignored either
])
def test_unsupported_parameters_are_400_naming_them(tiny, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        tiny.chat.completions.create(model="model", messages=ask("France"), max_tokens=2, extra_body=extra)
    assert e.value.param == param and param in e.value.message


def test_neutral_values_of_unsupported_parameters_are_accepted(tiny):
    r = tiny.chat.completions.create(model="model", messages=ask("France"), max_tokens=2, presence_penalty=0,
                                     frequency_penalty=0, response_format={"type": "text"}, logprobs=False,
                                     user="someone")
    assert r.choices


def test_unsupported_message_content_is_400(tiny):
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with pytest.raises(openai.BadRequestError) as e:
        tiny.chat.completions.create(model="model", messages=[{"role": "user", "content": [image]}])
    assert e.value.param == "messages[0].content" and "image_url" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        tiny.chat.completions.create(model="model", messages=[{"role": "tool", "content": "4", "tool_call_id": "1"}])
    assert e.value.param == "messages[0].role"


def chat_answer(client, messages: list[dict]) -> tuple[str, int]:
    """The greedy reply and the prompt's length in tokens."""
    r = client.chat.completions.create(model="model", messages=messages, max_tokens=8, **GREEDY)
    return r.choices[0].message.content, r.usage.prompt_tokens


def test_text_content_parts_are_accepted(tiny):
    first, second = "What is the capital", "of France?"
    parts = chat_answer(tiny, [{"role": "user", "content": [{"type": "text", "text": first},
                                                            {"type": "text", "text": second}]}])
    assert parts == chat_answer(tiny, [{"role": "user", "content": f"{first}\n{second}"}])  # one part per line
    only_first = chat_answer(tiny, [{"role": "user", "content": [{"type": "text", "text": first}]}])
    assert parts[1] > only_first[1] and parts[0] != only_first[0]  # both parts reached the model


def test_the_developer_role_is_the_system_role(tiny):
    question = {"role": "user", "content": "What is the capital of France?"}
    developer = chat_answer(tiny, [{"role": "developer", "content": "Answer in French."}, question])
    assert developer == chat_answer(tiny, [{"role": "system", "content": "Answer in French."}, question])
    assert developer != chat_answer(tiny, [{"role": "user", "content": "Answer in French."}, question])
    assert developer[1] > chat_answer(tiny, [question])[1]  # not dropped


def test_max_tokens_beyond_the_context_is_400(tiny):
    with pytest.raises(openai.BadRequestError) as e:
        tiny.chat.completions.create(model="model", messages=ask("France"), max_tokens=TINY_CONTEXT)
    assert e.value.code == "context_length_exceeded" and e.value.param == "max_tokens"
    assert f"({TINY_CONTEXT} tokens)" in e.value.message


def test_prompt_too_long_for_the_context_is_400(tiny):
    long = [{"role": "user", "content": "word " * TINY_CONTEXT}]
    with pytest.raises(openai.BadRequestError) as e:
        tiny.chat.completions.create(model="model", messages=long)
    assert e.value.code == "context_length_exceeded" and e.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        tiny.completions.create(model="model", prompt="x" * TINY_CONTEXT)
    assert e.value.param == "prompt"


@pytest.mark.parametrize("kwargs, param", [
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 100}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": ""}, "stop"),
])
def test_out_of_range_values_are_400(tiny, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        tiny.chat.completions.create(model="model", messages=ask("France"), **kwargs)
    assert e.value.param == param


def test_unknown_route_is_an_openai_style_404(tiny_server):
    with pytest.raises(openai.NotFoundError):
        client_for(tiny_server).embeddings.create(model="model", input="hello")


def test_still_serving_after_bad_requests(tiny):
    # Runs after the error tests above (file order): none of them broke the worker.
    assert tiny.chat.completions.create(model="model", messages=ask("France"), max_tokens=2).choices


# ----- a busy port -----

def test_a_busy_port_is_a_one_line_error(tiny_server, tiny_model, tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "torchchat.py", "server", "--port", str(tiny_server.port),
                        *tiny_model.cli_flags()], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: cannot listen on 127.0.0.1:") and "--port" in r.stderr


# ----- the real model: right answers, concurrency, stop strings, disconnects -----

def test_chat_answers_the_capital_of_france(smol):
    r = smol.chat.completions.create(model="smollm2-135m", messages=ask("France"), max_tokens=32, **GREEDY)
    assert "Paris" in r.choices[0].message.content


def test_streamed_chat_answers_the_capital_of_france(smol):
    stream = smol.chat.completions.create(model="SmolLM2-135M-Instruct", messages=ask("France"), max_tokens=32,
                                          stream=True, **GREEDY)
    pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 3  # token by token, not one block
    assert "Paris" in "".join(pieces)


def test_four_concurrent_clients_each_get_their_own_answer(smol):
    def answer(country: str) -> str:
        r = smol.chat.completions.create(model="smollm2-135m", messages=ask(country), max_tokens=24, **GREEDY)
        return r.choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(len(CAPITALS)) as pool:
        answers = dict(zip(CAPITALS, pool.map(answer, CAPITALS)))
    for country, capital in CAPITALS.items():
        assert capital in answers[country], answers
        assert all(other not in answers[country] for other in CAPITALS.values() if other != capital), answers
    # Alone, each request gives the very same text: nothing leaked between them.
    assert answer("Japan") == answers["Japan"]


COUNT = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]


def test_stop_strings_end_the_reply_and_are_not_sent(smol):
    full = smol.chat.completions.create(model="smollm2-135m", messages=COUNT, max_tokens=20, **GREEDY)
    text = full.choices[0].message.content
    assert "4, 5" in text, text
    r = smol.chat.completions.create(model="smollm2-135m", messages=COUNT, max_tokens=20, stop=", 5", **GREEDY)
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == text[: text.find(", 5")]
    # The stream holds back ", " until it knows whether "5" follows: no piece of a stop string leaks.
    stream = smol.chat.completions.create(model="smollm2-135m", messages=COUNT, max_tokens=20, stop=["7", ", 5"],
                                          stream=True, **GREEDY)
    chunks = [c for c in stream if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_a_client_leaving_mid_stream_stops_the_generation(smol_server, smol):
    story = [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}]
    before = smol_server.log().count("request cancelled")
    body = json.dumps({"model": "smollm2-135m", "messages": story, "max_tokens": 600, "stream": True, **GREEDY})
    conn = http.client.HTTPConnection("127.0.0.1", smol_server.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    for _ in range(3):
        assert response.readline().startswith(b"data: ")
        response.readline()
    conn.close()  # the client goes away after a few tokens
    t0 = time.monotonic()
    r = smol.chat.completions.create(model="smollm2-135m", messages=ask("France"), max_tokens=8, **GREEDY)
    assert "Paris" in r.choices[0].message.content
    assert time.monotonic() - t0 < 15
    assert smol_server.wait_for_log("request cancelled", before + 1) == before + 1  # the story left the batch


def test_a_client_timing_out_on_a_plain_request_stops_the_generation(smol_server, smol):
    story = [{"role": "user", "content": "Write a long story about a cat who sails around the world."}]
    before = smol_server.log().count("request cancelled")
    with pytest.raises(openai.APITimeoutError):
        client_for(smol_server, timeout=1.5).chat.completions.create(model="smollm2-135m", messages=story,
                                                                     max_tokens=600, **GREEDY)
    r = smol.chat.completions.create(model="smollm2-135m", messages=ask("Germany"), max_tokens=8, **GREEDY)
    assert "Berlin" in r.choices[0].message.content
    # the server polls for a client gone (DISCONNECT_POLL_S): on a loaded machine Germany may be answered first
    assert smol_server.wait_for_log("request cancelled", before + 1) == before + 1


# ----- distributed: rank 0 serves, rank 1 follows -----

def check_answers_like_the_local_one(server: ServerProcess, tiny):
    client = client_for(server)
    for country in ("France", "Germany"):
        local = tiny.chat.completions.create(model="model", messages=ask(country), max_tokens=8, **GREEDY)
        remote = client.chat.completions.create(model="model", messages=ask(country), max_tokens=8, **GREEDY)
        assert remote.choices[0].message.content == local.choices[0].message.content
        streamed = client.chat.completions.create(model="model", messages=ask(country), max_tokens=8,
                                                  stream=True, **GREEDY)
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == \
            local.choices[0].message.content


def check_ctrl_c_stops_every_rank(server: ServerProcess):
    """Ctrl-C in a terminal: every process of the group gets SIGINT; rank 0 shuts down and tells the others.

    The launcher forwards its copy to every rank as well, so rank 0 gets it twice: sent here in that order,
    50 ms apart: the two never merge into one delivery (as they may when they arrive together), and the
    second comes while rank 0 is still shutting down (its first 0.1 s tick has not even come).
    """
    ranks = [int(pid) for pid in re.findall(r"^\[rank\d+\] pid=(\d+)", server.log(), re.M)]
    assert len(ranks) == 2, server.log()
    for pid in ranks:
        os.kill(pid, signal.SIGINT)
    time.sleep(0.05)
    server.stop(signal.SIGINT, timeout=60)
    log = server.log()
    assert "Application shutdown complete" in log
    assert "could not tell the other processes" not in log  # the follower left when rank 0 said so
    assert port_is_free(server.port)


PP2 = ["--pp", "2", "--max-seq-length", str(TINY_CONTEXT)]


def test_distributed_server_answers_like_the_local_one(tiny_model, tiny, tmp_path):
    # As the rest of the suite runs torchrun (tests/distributed_procs.py): a bare `torchrun` may not be on PATH.
    # torchrun itself ends a Ctrl-C with exit code 1 and a SignalException traceback; the ranks must not.
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2"]
    server = ServerProcess([*tiny_model.cli_flags(), *PP2], tmp_path / "server.log", launcher=launcher,
                           clean_exits={signal.SIGINT: 1}, launcher_traceback=r"SignalException: .* got signal: 2$")
    try:
        server.wait_ready(timeout=240)
        check_answers_like_the_local_one(server, tiny)
        check_ctrl_c_stops_every_rank(server)
    finally:
        server.stop(signal.SIGKILL, check=False)


def test_self_launched_distributed_server_answers_like_the_local_one(tiny_model, tiny, tmp_path):
    """`python torchchat.py server --pp 2`: torchchat starts its own two ranks (no torchrun)."""
    server = ServerProcess([*tiny_model.cli_flags(), *PP2], tmp_path / "server.log")
    try:
        server.wait_ready(timeout=240)
        assert "[rank1] pid=" in server.log()
        check_answers_like_the_local_one(server, tiny)
        check_ctrl_c_stops_every_rank(server)
    finally:
        server.stop(signal.SIGKILL, check=False)
