"""The workloads of server_bench.py, each against a server's URL: clients at once, the same questions one
at a time, a short request among long ones, and a multi-turn conversation.

Every request is greedy (temperature 0) and asks for ``max_tokens``; a server may stop earlier at the end of
its answer, so the figures count the tokens each server reports it generated (usage.completion_tokens).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from benchlib.openai_client import Progress, Reply, chat

TOPICS = ["Rome", "the printing press", "the bicycle", "tea", "the telescope", "chess", "the violin", "paper",
          "the compass", "coffee", "the steam engine", "glass", "the piano", "maps", "the clock", "cheese",
          "the umbrella", "chocolate", "the lighthouse", "bread", "the calendar", "silk", "the windmill", "soap",
          "the alphabet", "the bridge", "porcelain", "the submarine", "the library", "the olympic games",
          "the postal service", "the railway", "the microscope", "the kite", "the canal", "the thermometer",
          "the zipper", "the guitar", "the newspaper", "the museum"]
SHORT_QUESTION = "What is the capital of France? Answer in one word."
SHORT_MAX_TOKENS = 8
FOLLOW_UPS = ["What happened next?", "Who were the most important people in that story?",
              "Tell me more about the first of them.", "How did that change everyday life?",
              "What do historians still disagree about?", "Summarize all of that in two sentences.",
              "Which book should I read to learn more?", "How is it remembered today?",
              "Thank you. One last surprising fact, please."]
# The short request goes out once every long one has streamed text (all of them decoding), or once one has
# streamed this share of its answer (a server that runs them one after another never decodes them together).
PROBE_SHARE = 4
PROBE_TIMEOUT_S = 900


def question(i: int) -> str:
    return f"Tell me about the history of {TOPICS[i]}."


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@dataclass
class Answer:
    """One request of a workload: what was asked and what came back; times relative to the workload's start."""

    question: str
    text: str
    completion_tokens: int
    prompt_tokens: int
    cached_tokens: int | None
    start_s: float
    end_s: float
    ttft_s: float | None  # streamed requests only
    messages: int = 1  # the messages the request carried (a conversation's turn carries all before it)

    @property
    def latency_s(self) -> float:
        return self.end_s - self.start_s

    @classmethod
    def of(cls, asked: str, reply: Reply, t0: float, messages: int = 1) -> "Answer":
        return cls(asked, reply.text, reply.completion_tokens, reply.prompt_tokens, reply.cached_tokens,
                   reply.start_s - t0, reply.end_s - t0, reply.ttft_s, messages)


@dataclass
class Level:
    """Some clients at once (or, ``one_at_a_time``, their questions answered in turn by one client)."""

    clients: int
    answers: list[Answer]
    one_at_a_time: bool = False

    @property
    def wall_s(self) -> float:
        """From the first request sent to the last answer received."""
        return max(a.end_s for a in self.answers) - min(a.start_s for a in self.answers)


def warm_up(url: str, clients: int):
    """First-call costs (kernel builds, allocations, a batch shape seen the first time) out of the figures."""
    chat(url, user(SHORT_QUESTION), 4)
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda _: chat(url, user(SHORT_QUESTION), 4), range(clients)))


def run_level(url: str, clients: int, requests_per_client: int, max_tokens: int, first_question: int = 0,
              stream: bool = False) -> Level:
    """``clients`` threads released at once, each asking its own questions one after another."""
    gate = threading.Barrier(clients)
    t0 = time.perf_counter()

    def client(i: int) -> list[Answer]:
        asked = [question(first_question + i * requests_per_client + k) for k in range(requests_per_client)]
        gate.wait()  # all clients send their first request together
        return [Answer.of(q, chat(url, user(q), max_tokens, stream), t0) for q in asked]

    with ThreadPoolExecutor(clients) as pool:
        answers = [a for batch in pool.map(client, range(clients)) for a in batch]
    return Level(clients, answers)


def run_one_at_a_time(url: str, clients: int, max_tokens: int) -> Level:
    """The questions of ``clients`` clients, each sent when the previous answer is complete."""
    t0 = time.perf_counter()
    answers = [Answer.of(question(i), chat(url, user(question(i)), max_tokens), t0) for i in range(clients)]
    return Level(clients, answers, one_at_a_time=True)


@dataclass
class Probe:
    """A short streamed request sent while ``len(long)`` long ones run."""

    short: Answer
    long: list[Answer]
    long_decoding_when_sent: int  # long requests that had streamed text when the short one went out
    long_finished_before_first_token: int = field(init=False)  # answers the short one waited behind, at least

    def __post_init__(self):
        first = self.short.start_s + (self.short.ttft_s or self.short.latency_s)
        self.long_finished_before_first_token = sum(a.end_s < first for a in self.long)


def run_probe(url: str, long_count: int, max_tokens: int, first_question: int) -> Probe:
    """``long_count`` streamed long requests (questions not asked before); once they decode, the short one."""
    progress = [Progress() for _ in range(long_count)]
    t0 = time.perf_counter()

    def long_request(i: int) -> Answer:
        q = question(first_question + i)
        return Answer.of(q, chat(url, user(q), max_tokens, stream=True, progress=progress[i]), t0)

    with ThreadPoolExecutor(long_count) as pool:
        futures = [pool.submit(long_request, i) for i in range(long_count)]
        enough = max(2, max_tokens // PROBE_SHARE)
        deadline = time.monotonic() + PROBE_TIMEOUT_S
        while not (all(p.chunks for p in progress) or any(p.chunks >= enough for p in progress)
                   or all(f.done() for f in futures) or time.monotonic() > deadline):
            time.sleep(0.01)
        decoding = sum(p.chunks > 0 for p in progress)
        short = Answer.of(SHORT_QUESTION, chat(url, user(SHORT_QUESTION), SHORT_MAX_TOKENS, stream=True), t0)
        long = [f.result() for f in futures]
    return Probe(short, long, decoding)


def run_conversation(url: str, turns: int, max_tokens: int, topic: int = 0) -> list[Answer]:
    """One chat of ``turns`` user messages, each request carrying the whole conversation so far (the server's
    own earlier replies included), streamed for the time to first token."""
    if turns > len(FOLLOW_UPS) + 1:
        raise SystemExit(f"--conversation-turns ({turns}) must be at most {len(FOLLOW_UPS) + 1}")
    messages, answers = [], []
    t0 = time.perf_counter()
    for text in [question(topic), *FOLLOW_UPS][:turns]:
        messages.append({"role": "user", "content": text})
        answer = Answer.of(text, chat(url, messages, max_tokens, stream=True), t0, len(messages))
        messages.append({"role": "assistant", "content": answer.text})
        answers.append(answer)
    return answers
