"""server_bench.py's figures: per-workload summaries (the JSON), the table, and the issue's targets."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

from benchlib.server_load import Answer, Level, Probe

# torchchat's weight setting -> the llama.cpp file type it is compared with (as bench.py's LLAMA_CPP_TYPES).
LLAMA_CPP_TYPES = {"fp32": "F32", "bf16": "BF16", "int8": "Q8_0", "int4": "Q4_1"}


def load_average() -> list[float]:
    """The machine's 1, 5 and 15-minute load averages: on a shared machine, read the figures beside them."""
    return [round(x, 2) for x in os.getloadavg()]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile, linear between the closest ranks (numpy's default): p50 is the median."""
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def answer_row(a: Answer) -> dict:
    return {**asdict(a), "latency_s": a.latency_s}


def level_summary(level: Level) -> dict:
    latencies = [a.latency_s for a in level.answers]
    tokens = sum(a.completion_tokens for a in level.answers)
    ttfts = [a.ttft_s for a in level.answers if a.ttft_s is not None]
    return {"clients": level.clients, "one_at_a_time": level.one_at_a_time, "requests": len(level.answers),
            "completion_tokens": tokens, "wall_s": level.wall_s, "aggregate_tok_s": tokens / level.wall_s,
            "latency_p50_s": percentile(latencies, 50), "latency_p95_s": percentile(latencies, 95),
            "latency_max_s": max(latencies), "ttft_p50_s": percentile(ttfts, 50) if ttfts else None,
            "answers": [answer_row(a) for a in level.answers]}


def probe_summary(probe: Probe) -> dict:
    return {"short_ttft_s": probe.short.ttft_s, "short": answer_row(probe.short),
            "long_requests": len(probe.long), "long_decoding_when_sent": probe.long_decoding_when_sent,
            "long_finished_before_first_token": probe.long_finished_before_first_token,
            "long": [answer_row(a) for a in probe.long]}


def conversation_summary(answers: list[Answer]) -> dict:
    cached = [a.cached_tokens for a in answers]
    return {"turns": [answer_row(a) for a in answers],
            "total_prompt_tokens": sum(a.prompt_tokens for a in answers),
            "total_cached_tokens": sum(cached) if all(c is not None for c in cached) else None,
            "total_ttft_s": sum(a.ttft_s for a in answers)}


@dataclass
class ServerRun:
    """Everything measured against one server: its levels (1 client first), the one-at-a-time comparison,
    the short-request probe, the conversation (and the same conversation on a server without prefix reuse)."""

    server: str  # "torchchat" or "llama.cpp", with the flags that change how it batches
    weights: str  # torchchat's setting ("fp32", "int4", ...) or the GGUF's file type ("F32", "Q4_1", ...)
    command: list[str]
    levels: list[Level] = field(default_factory=list)
    one_at_a_time: Level | None = None
    probe: Probe | None = None
    conversation: list[Answer] | None = None
    conversation_without_reuse: list[Answer] | None = None
    without_reuse_command: list[str] | None = None

    def summary(self) -> dict:
        """The JSON object of this run, with the table's figures at its top level."""
        levels = [level_summary(level) for level in self.levels]
        out = {"server": self.server, "weights": self.weights, "command": self.command, "levels": levels}
        one, many = levels[0], levels[-1]
        out.update(one_client_tok_s=one["aggregate_tok_s"], clients=many["clients"],
                   n_client_tok_s=many["aggregate_tok_s"], n_over_1=many["aggregate_tok_s"] / one["aggregate_tok_s"],
                   latency_p50_s=many["latency_p50_s"], latency_p95_s=many["latency_p95_s"],
                   latency_max_s=many["latency_max_s"], same_as_alone=self.same_as_alone())
        if self.one_at_a_time is not None:
            out["one_at_a_time"] = level_summary(self.one_at_a_time)
            out["concurrent_over_one_at_a_time"] = many["aggregate_tok_s"] / out["one_at_a_time"]["aggregate_tok_s"]
        if self.probe is not None:
            out["probe"] = probe_summary(self.probe)
        if self.conversation is not None:
            out["conversation"] = conversation_summary(self.conversation)
        if self.conversation_without_reuse is not None:
            out["conversation_without_reuse"] = {**conversation_summary(self.conversation_without_reuse),
                                                 "command": self.without_reuse_command}
        return out

    def same_as_alone(self) -> list[int] | None:
        """[answers of the most clients identical to the same question answered alone, answers compared]: the
        batch's greedy text against the 1-client level's and the one-at-a-time run's."""
        alone = {a.question: a.text for a in self.levels[0].answers}
        if self.one_at_a_time is not None:
            alone.update((a.question, a.text) for a in self.one_at_a_time.answers)
        compared = [a for a in self.levels[-1].answers if a.question in alone]
        return [sum(a.text == alone[a.question] for a in compared), len(compared)] if compared else None


COLUMNS = [  # (title, cell of a summary)
    ("server", lambda s: s["server"]),
    ("weights", lambda s: s["weights"]),
    ("1 client tok/s", lambda s: f"{s['one_client_tok_s']:.1f}"),
    ("N clients", lambda s: str(s["clients"])),
    ("aggregate tok/s", lambda s: f"{s['n_client_tok_s']:.1f}"),
    ("N / 1", lambda s: f"{s['n_over_1']:.2f}x"),
    ("one at a time tok/s", lambda s: f"{s['one_at_a_time']['aggregate_tok_s']:.1f}" if "one_at_a_time" in s else "-"),
    ("N / one at a time", lambda s: f"{s['concurrent_over_one_at_a_time']:.2f}x" if "one_at_a_time" in s else "-"),
    ("latency p50 / p95 / max s", lambda s: f"{s['latency_p50_s']:.2f} / {s['latency_p95_s']:.2f} / "
                                            f"{s['latency_max_s']:.2f}"),
    ("short TTFT s", lambda s: f"{s['probe']['short_ttft_s']:.2f}" if "probe" in s else "-"),
    ("same as alone", lambda s: f"{s['same_as_alone'][0]}/{s['same_as_alone'][1]}" if s["same_as_alone"] else "-"),
]


def markdown_table(summaries: list[dict]) -> str:
    lines = ["| " + " | ".join(title for title, _ in COLUMNS) + " |",
             "|" + "|".join("---" if i < 2 else "---:" for i in range(len(COLUMNS))) + "|"]
    lines += ["| " + " | ".join(cell(s) for _, cell in COLUMNS) + " |" for s in summaries]
    return "\n".join(lines)


def conversation_table(summaries: list[dict]) -> str:
    """Per turn of each server's conversation: prompt tokens, those the server says it reused, and TTFT."""
    runs = [(s["server"] + " " + s["weights"], s["conversation"]) for s in summaries if "conversation" in s]
    runs += [(s["server"] + " " + s["weights"] + " without reuse", s["conversation_without_reuse"])
             for s in summaries if "conversation_without_reuse" in s]
    if not runs:
        return ""
    lines = ["| turn | " + " | ".join(f"{name}: prompt / cached / TTFT s" for name, _ in runs) + " |",
             "|---:|" + "---:|" * len(runs)]

    def cell(turn: dict) -> str:
        cached = "-" if turn["cached_tokens"] is None else str(turn["cached_tokens"])
        return f"{turn['prompt_tokens']} / {cached} / {turn['ttft_s']:.2f}"

    for i in range(max(len(c["turns"]) for _, c in runs)):
        lines.append(f"| {i + 1} | " + " | ".join(cell(c["turns"][i]) if i < len(c["turns"]) else "-"
                                                 for _, c in runs) + " |")
    totals = [f"{c['total_prompt_tokens']} / {'-' if c['total_cached_tokens'] is None else c['total_cached_tokens']}"
              f" / {c['total_ttft_s']:.2f}" for _, c in runs]
    lines.append("| total | " + " | ".join(totals) + " |")
    return "\n".join(lines)


@dataclass
class Target:
    what: str
    measured: float
    bound: float
    at_least: bool  # measured >= bound is met; else measured <= bound

    @property
    def met(self) -> bool:
        return self.measured >= self.bound if self.at_least else self.measured <= self.bound

    def line(self) -> str:
        op = ">=" if self.at_least else "<="
        return f"{'met    ' if self.met else 'NOT met'}  {self.what}: {self.measured:.2f} (target {op} {self.bound})"


def targets(summaries: list[dict]) -> list[Target]:
    """The issue's targets that this run's rows measure."""
    found = []
    for s in summaries:
        if not s["server"].startswith("torchchat"):
            continue
        name = f"{s['server']} {s['weights']}"
        if s["weights"] in ("fp32", "int4"):
            bound = 4.0 if s["weights"] == "fp32" else 2.0
            found.append(Target(f"{name}: {s['clients']} clients / 1 client", s["n_over_1"], bound, True))
        peer = next((p for p in summaries if p["server"] == "llama.cpp" and p["clients"] == s["clients"]
                     and p["weights"] == LLAMA_CPP_TYPES.get(s["weights"])), None)
        if peer is not None:
            found.append(Target(f"{name}: aggregate / llama.cpp {peer['weights']}'s",
                                s["n_client_tok_s"] / peer["n_client_tok_s"], 1.5, True))
        found.append(Target(f"{name}: max latency / median", s["latency_max_s"] / s["latency_p50_s"], 1.3, False))
        if "probe" in s:
            found.append(Target(f"{name}: short request's TTFT (s) among {s['probe']['long_requests']} long ones",
                                s["probe"]["short_ttft_s"], 1.0, False))
        if "one_at_a_time" in s:
            found.append(Target(f"{name}: {s['clients']} clients at once / one at a time",
                                s["concurrent_over_one_at_a_time"], 1.5, True))
    return found
