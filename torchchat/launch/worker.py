"""Running a command over several processes: ``run_distributed(args, argv, command)``.

``command`` is the CLI's table entry (``torchchat.cli.Command``): this module imports nothing of the
CLI, it calls ``command.run_on_rank(args, prep, build, io_rank)`` on every rank.

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

from torchchat.builder import Prepared, build_distributed_generator, resolve_device
from torchchat.distributed.parallel_dims import ParallelDims
from torchchat.distributed.process_group import (WorkerEnv, all_gather_objects, collective_timeout, is_peer_failure,
                                                 process_group, rank_prefixed_stderr, set_threads, worker_device)
from torchchat.errors import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_PEER_FAILED, EXIT_USER_ERROR, ConfigError
from torchchat.launch.spawn import die_with_launcher, launch_workers


def run_distributed(args, argv: list[str], command) -> int:
    """A command with --tp x --pp > 1 or under torchrun: ``command`` has ``run_on_rank`` and ``followers``."""
    env = WorkerEnv.from_environ()
    if env is None:
        world = args.tp * args.pp
        return launch_workers(argv, world, check=lambda rank0: check_job(args, rank0))
    code = run_worker(args, env, command)  # the process group is destroyed by now, on every way out
    if code == EXIT_OK:
        # A rank that succeeded leaves without the interpreter's finalization: there, gloo's threads can still hold
        # work objects whose tensors reach for the GIL, and the process aborts ("terminate called without an active
        # exception", SIGABRT; pytorch/pytorch#190489) after a run that went well (seen in CI: rank 0 of
        # `torchrun ... generate --tp 2`, after its text and stats). Everything it owns is closed; only its streams
        # need flushing. A failing rank exits as usual: leaving at once, it would have its launcher stop the rank
        # that is still saying why (rank 0's one error line) before it says it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


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


def run_worker(args, env: WorkerEnv, command) -> int:
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
        # A server's followers leave when rank 0 tells them (generator.end_session()); only rank 0 acts on Ctrl-C
        # and on SIGTERM (torchrun forwards both to every rank): it drains in-flight requests, then says so.
        follower = command.followers and env.rank != 0
        signal.signal(signal.SIGINT, signal.SIG_IGN if follower else _interrupt)
        if follower:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return _run_in_group(args, env, job, log, command)


def _run_in_group(args, env: WorkerEnv, job: Job, log, command) -> int:
    startup = Startup(job, env)
    try:
        with process_group(env, job.device):
            try:
                # The same command functions as one process, with the distributed generator and rank 0 reading.
                return command.run_on_rank(args, job.prep, startup.build, env.rank == 0)
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
        """The factory the command functions call: ``max_seq_len`` is None where the prompt is unknown."""
        max_seq_len = self.agree(value=max_seq_len)
        self.generator = build_distributed_generator(args, prep, self.job.dims, self.job.device, max_seq_len,
                                                     max_batch=max_batch)
        return self.generator

    def close(self):
        if self.generator is not None:
            self.generator.close()


def _first_line(error: BaseException) -> str:
    """The gist of a collective's error: no source location, first sentence."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(error).strip())  # gloo's "[.../pair.cc:553] " prefix
    text = text.splitlines()[0] if text else type(error).__name__
    return text.split(". ")[0][:160]
