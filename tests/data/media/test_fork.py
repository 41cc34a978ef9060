"""Forking (what checkpoint writers do) while the loader holds DALI pipelines in its threads."""

from __future__ import annotations

import gc
import multiprocessing
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from lumos_mcore.data.media.buckets import Bucket, crop_roi
from lumos_mcore.data.media.dali_decode import FORK_GUARD, DecodeRequest
from lumos_mcore.data.media.synthetic import encode_video, render_clip

FORK = multiprocessing.get_context("fork")


def _collect_and_exit() -> None:
    gc.collect()  # would run Pipeline.__del__ on any pipeline the child dropped


def _assert_forked_child_exits() -> None:
    """Fork a child that runs the gc and exits; it must be gone, cleanly, within 60 s."""
    child = FORK.Process(target=_collect_and_exit)
    child.start()
    child.join(timeout=60)
    hung = child.is_alive()
    if hung:
        child.kill()
    assert not hung and child.exitcode == 0, f"child hung={hung}, exit code {child.exitcode}"


def test_fork_after_decoding_in_a_worker_thread_does_not_hang() -> None:
    """Regression: pipelines kept in threading.local died in the child (fork drops other
    threads' locals) and Pipeline.__del__ waited forever for DALI threads that do not exist."""
    pytest.importorskip("nvidia.dali")
    from lumos_mcore.data.media.decode import MediaDecoder

    data = encode_video(render_clip(0, 32, 32, 8, seed=0, jitter=0), "vp9")[0]
    b = Bucket(32, 32, 4)
    req = DecodeRequest(data, "video", "vp9", (32, 32), crop_roi(32, 32, b), (32, 32), 0, 4, 1)
    dec = MediaDecoder(backend="dali", dali_device="cpu")
    with ThreadPoolExecutor(1) as pool:  # the prefetch thread builds and owns the pipeline
        assert pool.submit(dec.decode, [req]).result()[0].shape == (3, 4, 32, 32)
        _assert_forked_child_exits()
        assert pool.submit(dec.decode, [req]).result()[0].shape == (3, 4, 32, 32)


def _report(flag: threading.Event) -> None:
    raise SystemExit(0 if flag.is_set() else 3)


def test_fork_waits_for_in_flight_decodes() -> None:
    released = threading.Event()
    entered = threading.Event()

    def decode_for_a_while() -> None:
        with FORK_GUARD.running():
            entered.set()
            time.sleep(0.3)
            released.set()  # set before leaving the guarded region

    t = threading.Thread(target=decode_for_a_while)
    t.start()
    entered.wait()
    child = FORK.Process(target=_report, args=(released,))
    child.start()  # blocks in the before-fork hook until the decode is done
    child.join(timeout=30)
    t.join()
    assert child.exitcode == 0  # the child was forked after the decode finished
    with FORK_GUARD.running():  # the guard is usable again in the parent
        pass


def _garbage_pipeline() -> None:
    from lumos_mcore.data.media.dali_decode import _video_pipeline

    pipe = _video_pipeline(2, 1, "cpu", None)
    pipe.build()
    cycle = [pipe]
    cycle.append(cycle)  # unreachable once this returns: only the cyclic gc can free it


def test_fork_with_a_garbage_pipeline_in_the_parent() -> None:
    """Regression (a CI hang): a built pipeline left in a reference cycle in the parent was
    inherited by the forked child, whose gc ran Pipeline.__del__ on DALI threads that do not
    exist there (abort or hang). The before-fork hook collects the parent's garbage first."""
    pytest.importorskip("nvidia.dali")
    was_enabled = gc.isenabled()
    gc.disable()  # keep the parent's automatic gc from freeing the pipeline before the fork
    try:
        with ThreadPoolExecutor(1) as pool:  # built in a thread, as the prefetch threads do
            pool.submit(_garbage_pipeline).result()
        _assert_forked_child_exits()
    finally:
        if was_enabled:
            gc.enable()
