"""torchchat.cpu.run_queue: other runnable threads from /proc/loadavg, and whether ours would find a core each."""

from __future__ import annotations

import os

from torchchat.cpu import run_queue


def loadavg(tmp_path, runnable: int):
    path = tmp_path / "loadavg"
    path.write_text(f"1.50 0.90 0.40 {runnable}/312 4242\n")
    return path


def test_others_runnable_excludes_the_reader(tmp_path):
    assert run_queue.others_runnable(loadavg(tmp_path, 3)) == 2
    assert run_queue.others_runnable(loadavg(tmp_path, 1)) == 0


def test_no_answer_without_a_readable_loadavg(tmp_path):
    assert run_queue.others_runnable(tmp_path / "missing") is None
    (tmp_path / "odd").write_text("nothing here\n")
    assert run_queue.others_runnable(tmp_path / "odd") is None
    assert not run_queue.overcommitted(2, tmp_path / "missing")


def test_overcommitted_when_others_leave_fewer_cores_than_our_threads(tmp_path):
    cpus = os.cpu_count()
    assert not run_queue.overcommitted(2, loadavg(tmp_path, 1))  # only the reader
    assert not run_queue.overcommitted(cpus, loadavg(tmp_path, 1))
    assert run_queue.overcommitted(cpus, loadavg(tmp_path, 2))  # one other: one of our threads waits
    assert not run_queue.overcommitted(1, loadavg(tmp_path, cpus))  # cpus - 1 others: a core left for ours
    assert run_queue.overcommitted(1, loadavg(tmp_path, cpus + 1))


def test_one_read_without_others_is_enough_to_say_no(monkeypatch):
    """A thread runnable at one read only (a passing daemon) does not make the machine overcommitted."""
    reads = iter([os.cpu_count(), 0, os.cpu_count()])
    monkeypatch.setattr(run_queue, "others_runnable", lambda path: next(reads))
    assert not run_queue.overcommitted(1)
    reads = iter([os.cpu_count()] * run_queue.READS)
    assert run_queue.overcommitted(1)
