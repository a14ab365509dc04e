"""`registry.concurrent_io.run_all`: results in order, every job runs, the first failure in job order is raised."""

import io
import threading

import numpy as np
import pytest

from registry.concurrent_io import run_all
from registry.format import _write_npy


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_results_come_back_in_job_order(workers):
    assert run_all([lambda i=i: i * i for i in range(9)], workers) == [i * i for i in range(9)]


@pytest.mark.parametrize("workers", [1, 3])
def test_every_job_runs_and_the_first_failure_in_job_order_is_raised(workers):
    ran, lock, later_failed = [], threading.Lock(), threading.Event()

    def job(i: int) -> int:
        with lock:
            ran.append(i)
        if i == 2 and workers > 1:
            later_failed.wait(10)  # job 5 fails first in time; job 2 is still the one raised
        if i in (2, 5):
            if i == 5:
                later_failed.set()
            raise ValueError(f"job {i}")
        return i

    with pytest.raises(ValueError, match="job 2"):
        run_all([lambda i=i: job(i) for i in range(7)], workers)
    assert sorted(ran) == list(range(7))


def test_no_jobs_no_results():
    assert run_all([]) == []


@pytest.mark.parametrize("shape", [(7, 5), (0, 4), (3000, 1024)])
def test_vectors_are_written_as_numpy_writes_them_byte_for_byte(shape):
    array = np.random.default_rng(0).random(shape, dtype=np.float32)
    expected, written = io.BytesIO(), io.BytesIO()
    np.lib.format.write_array(expected, array, version=(1, 0))
    _write_npy(array, written)
    assert written.getvalue() == expected.getvalue()
