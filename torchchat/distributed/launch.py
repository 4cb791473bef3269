"""Running `generate`, `chat` and `server` over several processes: ``run_distributed(args)``.

Two ways in:

- under torchrun (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set), this process is one
  rank: ``run_worker`` checks, joins the process group, builds a DistributedGenerator and runs the
  command;
- without a launcher, ``spawn.launch_workers`` checks, then starts tp x pp copies of this same
  command line as ranks and watches them.

Every rank runs the same checks before loading anything, in the same order, so that a user error
fails every process alike, at once and without a process group to hang on. What only rank 0
knows (the prompt it reads) is settled by one agreement collective right after the process group
forms (``Startup.agree``). Exit codes of a rank: 0 done, 2 a user error (reported once, by rank 0),
3 another rank failed (the launcher reports the first real failure, not these echoes), 130
interrupted, 1 anything else.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import traceback
from dataclasses import dataclass

import torch.distributed as dist

from torchchat.cli import (DEFAULT_CHAT_SEQ_LEN, Prepared, cmd_chat, cmd_generate, read_prompt, resolve_device)
from torchchat.distributed.parallel_dims import ParallelDims
from torchchat.distributed.process_group import (WorkerEnv, all_gather_objects, collective_timeout, process_group,
                                                 rank_prefixed_stderr, set_threads, worker_device)
from torchchat.distributed.spawn import die_with_launcher, launch_workers
from torchchat.errors import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_PEER_FAILED, EXIT_USER_ERROR, ConfigError

# What gloo and NCCL say when the other side of a collective went away or never answered.
_PEER_FAILURE_SIGNS = ("connection closed", "connection reset", "broken pipe", "timed out", "timeout",
                       "connection refused", "socket closed", "nccl communicator was aborted", "read error")


def run_distributed(args, argv: list[str] | None = None) -> int:
    """The entry point for `generate`, `chat` and `server` with --tp x --pp > 1 or under torchrun."""
    env = WorkerEnv.from_environ()
    if env is None:
        return launch_workers(args, sys.argv[1:] if argv is None else argv)
    return run_worker(args, env)


@dataclass
class Job:
    """What every rank checks before joining the others: parallel layout, model files, device."""

    dims: ParallelDims
    prep: Prepared
    device: str


def check_job(args, env: WorkerEnv) -> Job:
    """The checks every process of the job runs alike before any weight is loaded (ConfigError)."""
    if args.compile or args.quantize:
        raise ConfigError("--compile and --quantize are for one process; drop them with --tp/--pp")
    collective_timeout()  # a bad TORCHCHAT_DIST_TIMEOUT_S fails here, not once per rank in process_group
    dims = ParallelDims(tp=args.tp, pp=args.pp, world_size=env.world_size)
    device_type = resolve_device(args.device)
    dims.check_devices(device_type, env.local_world_size)  # one GPU per process of this node
    prep = Prepared(args)
    dims.check_model(prep.model_args, prep.source.name)
    device = worker_device(device_type, env)
    return Job(dims, prep, device)


class Interrupted(BaseException):
    """Ctrl-C on a rank: ends the run on every rank.

    Not a KeyboardInterrupt, which a chat catches to stop one reply: one rank alone cannot stop
    a reply that the others are still computing.
    """


def _interrupt(signum, frame):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C (or the launcher's copy) must not cut cleanup
    raise Interrupted()


def run_worker(args, env: WorkerEnv) -> int:
    """One rank: check, join the process group, run the command, leave the group on every way out."""
    die_with_launcher()
    with rank_prefixed_stderr(env) as log:
        try:
            job = check_job(args, env)
        except ConfigError as e:
            # Every rank failed alike; the first process of each node tells its terminal.
            if env.local_rank == 0:
                print(f"error: {e}", file=log, flush=True)
            return EXIT_USER_ERROR
        print(f"pid={os.getpid()} local rank {env.local_rank} of {env.local_world_size}, world {env.world_size}, "
              f"{job.device}, master {env.master_addr}:{env.master_port}", file=log, flush=True)
        set_threads(env)
        serving = getattr(args, "handler_distributed", None) is not None and args.command not in ("generate", "chat")
        # A server's followers leave when rank 0 tells them (share_input(None)); only rank 0 acts on Ctrl-C
        # and on SIGTERM (torchrun forwards both to every rank): it drains in-flight requests, then says so.
        follower = serving and env.rank != 0
        signal.signal(signal.SIGINT, signal.SIG_IGN if follower else _interrupt)
        if follower:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return _run_in_group(args, env, job, log)


def _run_in_group(args, env: WorkerEnv, job: Job, log) -> int:
    startup = Startup(job, env)
    try:
        with process_group(env, job.device):
            try:
                return _run_command(args, job, startup)
            except Exception as e:
                startup.fail(e)  # before the agreement: the others learn of it there, and fail alike
                raise
            finally:
                startup.close()
    except Agreed as e:
        if env.rank == 0:
            print(f"error: {e}", file=log, flush=True)
        return EXIT_USER_ERROR
    except ConfigError as e:
        print(f"error: {e}", file=log, flush=True)
        return EXIT_USER_ERROR
    except Interrupted:
        if env.rank == 0:
            print("interrupted", file=log, flush=True)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - one line for a lost peer, a traceback for a bug
        if is_peer_failure(e):
            print(f"stopped: another rank failed or stopped answering ({_first_line(e)})", file=log, flush=True)
            return EXIT_PEER_FAILED
        traceback.print_exc(file=log)
        return EXIT_ERROR


def _run_command(args, job: Job, startup: "Startup") -> int:
    """The same command functions as one process, with the distributed generator and rank 0 reading."""
    io_rank = startup.env.rank == 0
    if args.command == "generate":
        return cmd_generate(args, prep=job.prep, build=startup.build,
                            read=read_prompt if io_rank else lambda _args: None)
    if args.command == "chat":
        return cmd_chat(args, prep=job.prep, build=startup.build)
    handler = getattr(args, "handler_distributed", None)  # e.g. the server: handler(generator, args) on every rank
    if handler is None:
        raise ConfigError(f"`{args.command}` does not run on several processes; drop --tp/--pp")
    generator = startup.build(args, job.prep, job.prep.max_seq_len(args, DEFAULT_CHAT_SEQ_LEN))
    return handler(generator, args)


class Agreed(ConfigError):
    """A user error found on some rank at startup, raised on every rank (rank 0 reports it)."""


class Startup:
    """The generator factory the command functions call on every rank: agree, then build.

    ``agree`` is the one startup collective: each rank says whether its own checks passed
    (only rank 0 reads the prompt, so only it knows whether the prompt fits), and rank 0's KV
    cache length becomes everyone's. A rank that failed before reaching it still takes part
    (``fail``), so that no rank waits for it until the timeout.
    """

    def __init__(self, job: Job, env: WorkerEnv):
        self.job = job
        self.env = env
        self.agreed = False
        self.generator = None

    def agree(self, value=None, error: str | None = None):
        """Every rank calls this once: rank 0's ``value`` on success, Agreed everywhere if any rank had an error."""
        self.agreed = True
        outcomes = all_gather_objects((error, value))  # startup, once
        failed = [(rank, err) for rank, (err, _) in enumerate(outcomes) if err is not None]
        if failed:
            rank, err = failed[0]
            raise Agreed(err if rank == 0 else f"rank {rank}: {err}")
        return outcomes[0][1]

    def fail(self, error: Exception):
        """This rank failed before the agreement: tell the others there, so that they fail alike.

        A user error becomes Agreed here too (rank 0 reports it once); any other error is re-raised
        by the caller, with its traceback, on this rank only.
        """
        if self.agreed or isinstance(error, Agreed):
            return
        try:
            self.agree(error=str(error) if isinstance(error, ConfigError) else f"{type(error).__name__}: {error}")
        except Agreed:
            if isinstance(error, ConfigError):
                raise

    def build(self, args, prep: Prepared, max_seq_len: int | None, max_batch: int = 1):
        """The factory ``cmd_generate`` / ``cmd_chat`` call: ``max_seq_len`` is None where the prompt is unknown."""
        from torchchat.generate.distributed import DistributedGenerator

        max_seq_len = self.agree(value=max_seq_len)
        self.generator = DistributedGenerator.from_source(
            prep.source, prep.tokenizer, prep.chat_format, self.job.dims, max_seq_len=max_seq_len,
            max_batch=max_batch, dtype=args.dtype, device=self.job.device)
        return self.generator

    def close(self):
        if self.generator is not None:
            self.generator.close()


def is_peer_failure(error: BaseException) -> bool:
    """Did a collective fail because another rank died, left or hung (not because of this rank)?"""
    if isinstance(error, getattr(dist, "DistNetworkError", ())):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(sign in text for sign in _PEER_FAILURE_SIGNS)


def _first_line(error: BaseException) -> str:
    """The gist of a collective's error: no source location, first sentence."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(error).strip())  # gloo's "[.../pair.cc:553] " prefix
    text = text.splitlines()[0] if text else type(error).__name__
    return text.split(". ")[0][:160]
