"""Cancellation: ``cnnscope.progress.cancellable`` makes the next pass boundary raise ``Cancelled``."""

import threading
import time

import pytest

from cnnscope.progress import Cancelled, Progress, cancellable, check_cancelled, is_cancelled


def test_outside_cancellable_nothing_is_cancelled():
    progress = Progress(10, "work", quiet=True)
    assert progress.should_stop() is False and not is_cancelled()
    check_cancelled()  # a no-op
    assert Progress(10, "work", quiet=True, max_seconds=0).should_stop() is True  # the early stop is unchanged


def test_a_set_event_raises_at_the_next_pass_boundary_and_only_inside_the_block():
    event = threading.Event()
    with cancellable(event):
        progress = Progress(100, "rise", quiet=True)
        progress.update(10)
        assert progress.should_stop() is False
        check_cancelled()
        event.set()
        assert is_cancelled()
        with pytest.raises(Cancelled, match="rise was cancelled after 10/100"):
            progress.should_stop()
        with pytest.raises(Cancelled):
            check_cancelled()
    assert not is_cancelled()
    check_cancelled()
    assert Progress(5, "later", quiet=True).should_stop() is False


def test_the_token_belongs_to_the_thread_that_set_it():
    event = threading.Event()
    event.set()
    seen = []

    def elsewhere():
        seen.append(is_cancelled())
        seen.append(Progress(1, "other", quiet=True).should_stop())

    with cancellable(event):
        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join(10)
        assert is_cancelled()
    assert seen == [False, False]


def test_nested_blocks_restore_the_outer_token():
    outer, inner = threading.Event(), threading.Event()
    with cancellable(outer):
        with cancellable(inner):
            outer.set()
            check_cancelled()  # the inner token is the one in force
        with pytest.raises(Cancelled):
            check_cancelled()


def test_a_long_rise_stops_soon_after_the_event_is_set(default_model, chelsea):
    import cnnscope

    method = cnnscope.get_method("rise")(default_model, masks=100_000, quiet=True, max_seconds=120)
    event = threading.Event()
    outcome = {}

    def run():
        started = time.perf_counter()
        try:
            with cancellable(event):
                method(chelsea, "top1")
            outcome["result"] = "finished"
        except Cancelled:
            outcome["result"] = "cancelled"
        outcome["seconds"] = time.perf_counter() - started

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(1.0)
    event.set()
    set_at = time.perf_counter()
    thread.join(30)
    assert not thread.is_alive()
    assert outcome["result"] == "cancelled" and time.perf_counter() - set_at < 5
