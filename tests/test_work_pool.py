"""The kernels' thread pool (torchchat/csrc/work_pool.h): chunks claimed by whichever thread runs, so the bits do not
depend on the thread count or on a thread that starts late, and a late thread holds nobody up. No timing is asserted:
a late thread is made with the pool's testing knob (a worker sleeps before it claims)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from tests.kernel_pool import LATE_US, SETTINGS, pool_counts, pool_workers, returns_within, runs
from tests.block_models import BATCH_ARGS, CACHE_ROWS, random_caches, random_model, scrambled_step
from torchchat import cpu as cpu_kernels
from torchchat.quantize import Int4Linear

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="CPU kernels not built")

@pytest.mark.parametrize("weights", ["fp32", "int8-blocks", "int4"])
def test_decode_layers_same_bits_whatever_the_threads(weights, pool):
    """A batch step through every block (the linears' row chunks and the attention's units on the pool): outputs and
    cache writes bit-identical on 1, 2 and 3 threads, with workers a little late and with workers that come after
    the call is over."""
    model = random_model(BATCH_ARGS, weights, cache_dtype=torch.float16, max_batch=CACHE_ROWS)
    with torch.no_grad():
        random_caches(model)
        start = [t.clone() for t in model.buffers()]
        h, rope, positions, rows = scrambled_step(model, 3, seed=1)

        def step():
            for t, value in zip(model.buffers(), start):
                t.copy_(value)
            out = cpu_kernels.decode_layers(model, h, rope, positions, rows)  # (3, 1, dim)
            return out, [t.clone() for t in model.buffers()]

        reference, reference_buffers = runs(1, step)
        for threads, late_us in SETTINGS:
            out, buffers = runs(threads, step, late_us)
            assert torch.equal(out, reference), f"{threads} threads, workers late by {late_us} us"
            assert all(torch.equal(a, b) for a, b in zip(buffers, reference_buffers)), f"{threads} threads: caches"


def test_gemv_same_bits_whatever_the_threads(pool):
    """The row kernels of every weight type, on a matrix of many chunks (a SmolLM2-sized output layer's rows)."""
    torch.manual_seed(0)
    x = torch.randn(3, 576)
    weight = torch.randn(4096, 576)
    int4 = Int4Linear.from_linear(torch.nn.Linear(576, 4096, bias=False), 32)
    products = {"fp32": lambda: torch.ops.torchchat.gemv(x, weight),
                "bf16": lambda: torch.ops.torchchat.gemv(x.bfloat16(), weight.bfloat16()),
                "int4": lambda: torch.ops.torchchat.gemv_int4(x, int4.packed, int4.scales_and_mins, 32)}
    for name, product in products.items():
        reference = runs(1, product)
        for threads, late_us in SETTINGS:
            assert torch.equal(runs(threads, product, late_us), reference), f"{name}: {threads} threads, {late_us} us"


def test_a_late_worker_holds_nobody_up(pool):
    """Workers that only wake after the call is over: the caller claims and computes every chunk itself and the
    call returns (with OpenMP's static blocks it would wait for the late thread's block)."""
    torch.manual_seed(0)
    x, weight = torch.randn(1, 576), torch.randn(4096, 576)
    reference = runs(1, lambda: torch.ops.torchchat.gemv(x, weight))
    torch.ops.torchchat.work_pool_reset()
    out = returns_within(60, lambda: runs(2, lambda: torch.ops.torchchat.gemv(x, weight), LATE_US))
    counts = pool_counts()
    assert torch.equal(out, reference)
    assert counts["regions"] == 1 and counts["caller_chunks"] > 1 and counts["worker_chunks"] == 0, counts


def test_workers_that_do_not_help_are_left_asleep(pool):
    """Never worse than one thread: regions in which the workers compute (almost) nothing, window after window, make
    the pool run the next short ones on the caller alone (solo regions), and wake the sleeping workers only for long
    ones (a woken thread preempts whoever shares its core; a wake-up costs a few us); then spin again."""
    torch.manual_seed(0)
    x, short, long = torch.randn(1, 576), torch.randn(256, 576), torch.randn(4096, 576)  # fp32: 19 and 293 chunks

    def many():
        outs = [torch.ops.torchchat.gemv(x, short) for _ in range(400)]
        return outs, torch.ops.torchchat.gemv(x, long)

    reference = runs(1, lambda: torch.ops.torchchat.gemv(x, long))
    torch.ops.torchchat.work_pool_reset()
    outs, long_out = returns_within(60, lambda: runs(2, many, LATE_US))
    counts = pool_counts()
    assert all(torch.equal(out, outs[0]) for out in outs) and torch.equal(long_out, reference)
    assert counts["worker_chunks"] == 0, counts
    assert counts["solo_regions"] > 0 and counts["regions"] + counts["solo_regions"] == 401, counts
    assert counts["regions"] >= 128, counts  # two windows of 64 regions judged before the first solo one
    assert counts["woken_regions"] == 1, counts  # the long one: published, the workers woken for it


def test_the_pool_follows_torchs_thread_count(pool):
    """One thread: every region runs on the caller, serially (no region is published to workers)."""
    torch.manual_seed(0)
    x, weight = torch.randn(1, 576), torch.randn(4096, 576)
    runs(1, lambda: torch.ops.torchchat.gemv(x, weight))
    assert pool_counts()["regions"] == 0
    runs(2, lambda: torch.ops.torchchat.gemv(x, weight))
    assert pool_counts()["regions"] == 1


@pytest.mark.parametrize("user_env, expected", [({}, "10000 10000"), ({"GOMP_SPINCOUNT": "5"}, "5 5"),
                                                ({"OMP_WAIT_POLICY": "passive"}, "None None")])
def test_importing_torchchat_sets_openmps_wait_before_torch_loads_unless_the_user_chose_one(user_env, expected):
    """torch's own threads (the prompt's GEMMs) spin ~1 ms at each wait unless told otherwise, and libgomp reads the
    setting once, when torch loads it: the package sets it first, and self-launched ranks inherit it."""
    import os
    import subprocess
    import sys

    code = ("import os, sys; import torchchat; assert 'torch' not in sys.modules; "
            "from torchchat.launch.spawn import worker_environ; "
            "print(os.environ.get('GOMP_SPINCOUNT'), worker_environ(1, 2, 29500).get('GOMP_SPINCOUNT'))")
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")} | user_env
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[-2] == expected


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_on_a_busy_machine_a_worker_woken_on_the_callers_cpu_moves_off_it(pool):
    """Linux tends to wake a sleeping worker onto its waker's CPU, where it queues behind the caller while the other
    process keeps a core to itself. Here the caller and the workers are pinned to one CPU, the workers made late
    (which makes the pool judge the machine busy): the worker woken for the long region moves to the other CPUs, and
    gets its own CPUs back once the machine is no longer judged busy."""
    torch.manual_seed(0)
    x, short, long = torch.randn(1, 576), torch.randn(256, 576), torch.randn(4096, 576)
    runs(2, lambda: torch.ops.torchchat.gemv(x, long))  # the worker exists
    everywhere = os.sched_getaffinity(0)
    caller_cpu = min(everywhere)
    workers = pool_workers()
    assert workers, "no thread named torchchat-pool"
    try:
        os.sched_setaffinity(0, {caller_cpu})  # this thread: the caller
        for tid in workers:
            os.sched_setaffinity(tid, {caller_cpu})
        torch.ops.torchchat.work_pool_reset()

        def busy_then_long():
            for _ in range(400):
                torch.ops.torchchat.gemv(x, short)
            return torch.ops.torchchat.gemv(x, long)

        returns_within(60, lambda: runs(2, busy_then_long, LATE_US))
        assert pool_counts()["woken_regions"] >= 1
        moved = everywhere - {caller_cpu}
        assert until(lambda: any(os.sched_getaffinity(tid) == moved for tid in workers)), \
            [os.sched_getaffinity(tid) for tid in workers]
        torch.ops.torchchat.work_pool_reset()  # no longer busy: the next region gives the worker its CPUs back
        runs(2, lambda: torch.ops.torchchat.gemv(x, long))
        assert until(lambda: any(os.sched_getaffinity(tid) == everywhere for tid in workers)), \
            [os.sched_getaffinity(tid) for tid in workers]
    finally:
        os.sched_setaffinity(0, everywhere)
        for tid in workers:
            os.sched_setaffinity(tid, everywhere)


def until(condition, seconds: float = 20) -> bool:
    """Polls condition() until it holds or `seconds` pass (a woken worker runs when the OS schedules it)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
