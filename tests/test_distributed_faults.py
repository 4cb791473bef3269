"""A rank dies mid-generation, or the user presses Ctrl-C: every process of the job must end, non-zero, soon.

The generations here are long (thousands of tokens on the tiny model) so that the fault lands
while every rank is inside the per-token collectives.
"""

import os
import signal
import time

import pytest

from tests.distributed_procs import Job, marked_pids, rank_envs, torchchat, torchrun, two_nodes
from tests.cli_process import write_endless_model

DEADLINE_S = 90  # "within about a minute", with room for 2 busy cores
LONG = ["--prompt", "Once upon a time", "--max-new-tokens", "3000", "--temperature", "0"]


@pytest.fixture(scope="module")
def long_model(tiny_model, tmp_path_factory):
    """The tiny model with a longer context and no stop token it would ever pick, so that a generation lasts
    long enough to be cut (the tiny model's own greedy text stops after 68 tokens)."""
    checkpoint = write_endless_model(tiny_model, tmp_path_factory.mktemp("long"), 4096)
    return ["--checkpoint-path", str(checkpoint), "--tokenizer-path", str(tiny_model.tokenizer)]


@pytest.fixture()
def marker(long_model):
    yield long_model[1]
    assert not marked_pids(long_model[1]), "processes of the job were left running"


def generating(job: Job) -> bool:
    """Rank 1 has started and rank 0 is streaming generated text."""
    return job.rank_pid(1) is not None and len(job.stdout()) > len("Once upon a time") + 20


def kill_rank_1_and_finish(job: Job) -> tuple[object, float]:
    job.wait_for(generating, 120, "generated text")
    os.kill(job.rank_pid(1), signal.SIGKILL)
    killed = time.monotonic()
    done = job.finish(DEADLINE_S + 30)
    return done, time.monotonic() - killed


def test_torchrun_rank_killed_mid_generation_ends_the_job(long_model, marker, tmp_path):
    job = Job(torchrun(2, "generate", *long_model, *LONG, "--tp", "2"), tmp_path, marker)
    done, elapsed = kill_rank_1_and_finish(job)
    assert done.returncode != 0, done.stderr
    assert elapsed < DEADLINE_S


def test_self_launched_rank_killed_mid_generation_ends_the_job(long_model, marker, tmp_path):
    job = Job(torchchat("generate", *long_model, *LONG, "--tp", "2"), tmp_path, marker)
    done, elapsed = kill_rank_1_and_finish(job)
    assert done.returncode == 1, done.stderr
    assert elapsed < DEADLINE_S
    launcher_lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(launcher_lines) == 1 and "rank 1" in launcher_lines[0] and "SIGKILL" in launcher_lines[0], done.stderr


def test_two_node_rank_killed_mid_generation_ends_the_other_node(long_model, marker, tmp_path):
    """Each 'node' has its own torchrun: rank 0's node learns of the death only through the collectives."""
    jobs = [Job(cmd, tmp_path, marker) for cmd in two_nodes("generate", *long_model, *LONG, "--pp", "2")]
    try:
        deadline = time.monotonic() + 120
        while not (any(j.rank_pid(1) for j in jobs) and any(len(j.stdout()) > 40 for j in jobs)):
            assert time.monotonic() < deadline, "no generated text:\n" + "\n".join(j.stderr() for j in jobs)
            assert all(j.proc.poll() is None for j in jobs), "\n".join(j.stderr() for j in jobs)
            time.sleep(0.05)
        pid = next(p for p in (j.rank_pid(1) for j in jobs) if p)
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        done = [job.finish(DEADLINE_S + 30, cleanup=False) for job in jobs]
        elapsed = time.monotonic() - killed
    finally:
        for job in jobs:
            job.kill()
    assert all(d.returncode != 0 for d in done), [d.stderr for d in done]
    assert elapsed < DEADLINE_S
    assert "[rank0] stopped: another rank failed" in "".join(d.stderr for d in done)


def test_ctrl_c_mid_generation_ends_every_self_launched_rank(long_model, marker, tmp_path):
    job = Job(torchchat("generate", *long_model, *LONG, "--pp", "2"), tmp_path, marker)
    try:
        job.wait_for(generating, 120, "generated text")
        os.killpg(job.proc.pid, signal.SIGINT)  # what a terminal does on Ctrl-C: launcher and ranks alike
        job.proc.wait(DEADLINE_S)
    finally:
        done = job.finish(1)
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr, done.stderr


def test_sigint_to_the_launcher_alone_ends_a_chat(long_model, marker, tmp_path):
    """The chat runs through the launcher's stdin; a SIGINT sent to the launcher only is passed on to the ranks."""
    job = Job(torchchat("chat", *long_model, "--max-new-tokens", "8", "--temperature", "0", "--tp", "2"),
              tmp_path, marker, stdin=True)
    try:
        job.send("Hello\n")
        job.wait_for(lambda j: j.stdout().count("You: ") == 2, 120, "the reply and the second prompt")
        os.kill(job.proc.pid, signal.SIGINT)
        job.proc.wait(DEADLINE_S)
    finally:
        done = job.finish(1)
    assert done.stdout.count("Assistant: ") == 1
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr, done.stderr


# ----- one rank's exit code: 3 when another rank died or stopped answering -----

TIMEOUT_S = 10  # TORCHCHAT_DIST_TIMEOUT_S for the next test (default 60)


@pytest.mark.parametrize("fault, layout",
                         [(signal.SIGKILL, "--tp"), (signal.SIGSTOP, "--tp"), (signal.SIGSTOP, "--pp")],
                         ids=["killed", "hung", "hung-pp2"])
def test_a_rank_whose_peer_died_or_hung_exits_3_with_one_line(fault, layout, long_model, marker, tmp_path):
    """Two ranks started by hand, as torchrun starts them (no launcher to sum up their exit codes). Rank 1
    killed: rank 0's next collective fails at once. Rank 1 stopped (SIGSTOP: alive, silent): rank 0's
    collective (TP), or its wait for a step's logits (PP), waits TORCHCHAT_DIST_TIMEOUT_S, then fails, although
    the plans travel on a group whose waits may last days (a chat's). Either way rank 0 says so in one line,
    exit 3."""
    cmd = torchchat("generate", *long_model, *LONG, layout, "2")
    envs = [{**env, "TORCHCHAT_DIST_TIMEOUT_S": str(TIMEOUT_S)} for env in rank_envs(2)]
    ranks = [Job(cmd, tmp_path, marker, env=env) for env in envs]
    try:
        ranks[0].wait_for(lambda j: len(j.stdout()) > len("Once upon a time") + 20 and ranks[1].rank_pid(1), 120,
                          "generated text")
        os.kill(ranks[1].proc.pid, fault)
        faulted = time.monotonic()
        ranks[0].proc.wait(TIMEOUT_S + DEADLINE_S)
        elapsed = time.monotonic() - faulted
        done = ranks[0].finish(1, cleanup=False)
    finally:
        for job in ranks:
            job.kill()
    assert done.returncode == 3, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    said = done.stderr.splitlines()
    assert said[-1].startswith("[rank0] stopped: another rank failed or stopped answering ("), done.stderr
    assert sum("stopped" in line or "error" in line for line in said) == 1, done.stderr
    if fault == signal.SIGKILL:
        assert elapsed < TIMEOUT_S  # measured 0.9 s: not the timeout
    else:  # the collective under way when rank 1 stopped started at most a token earlier
        # One timeout, not two: a rank whose step failed does not wait again to end the session (measured 11.9 s,
        # TP and PP; 21.5 s when it sent the followers an end-of-session plan after the failure)
        assert TIMEOUT_S - 1 <= elapsed < 2 * TIMEOUT_S - 1, elapsed
