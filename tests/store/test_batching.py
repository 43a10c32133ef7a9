"""Work that arrives while the same work runs waits, then runs as one batch
(app/store/batching.py)."""
import threading
import time

import peewee
import pytest

from app.store import batching
from app.store.batching import Gather
from tests.gateway_process import wait_for


def recording(monkeypatch):
    paused = []
    monkeypatch.setattr(batching, "pause", lambda: paused.append("pause"))
    return paused


def test_a_leader_pauses_once_so_that_others_may_join_it(monkeypatch):
    paused, runs = recording(monkeypatch), []
    gather = Gather(lambda group, items: (runs.append(list(items)), items)[1])
    assert gather("g", 1) == 1
    assert paused == ["pause"] and runs == [[1]]


def test_an_eager_leader_runs_at_once_and_later_arrivals_still_gather_behind_it(monkeypatch):
    paused, runs = recording(monkeypatch), []
    release = threading.Event()

    def run(group, items):
        runs.append(list(items))
        if items == ["first"]:
            release.wait(30)
        return [f"{item} done" for item in items]

    gather = Gather(run, eager=True)
    results = {}
    threads = [threading.Thread(target=lambda item=item: results.update({item: gather("g", item)}))
               for item in ("first", "second", "third")]
    threads[0].start()
    assert wait_for(lambda: runs == [["first"]], 30)
    for n, thread in enumerate(threads[1:], 1):
        thread.start()
        assert wait_for(lambda n=n: len(getattr(gather._gathering.get("g"), "items", ())) == n, 30)
    release.set()
    for thread in threads:
        thread.join(30)
    assert paused == []
    assert runs == [["first"], ["second", "third"]]  # one batch, in arrival order
    assert results == {"first": "first done", "second": "second done", "third": "third done"}
    assert gather.idle()


class Interrupted(BaseException):
    """What gevent raises in a greenlet it interrupts (a Timeout, GreenletExit)."""


def behind_a_running_batch(run, items):
    """`items` gathered in one batch behind a first one that runs (eager): {item: result or
    error}, once every caller has returned. The first batch, ["first"], succeeds."""
    release, outcomes = threading.Event(), {}

    def runs(group, batch):
        if batch == ["first"]:
            release.wait(30)
            return ["first done"]
        return run(group, batch)

    gather = Gather(runs, eager=True)

    def call(item):
        try:
            outcomes[item] = gather("g", item)
        except BaseException as exc:  # an Interrupted is an outcome here too
            outcomes[item] = exc

    threads = [threading.Thread(target=call, args=(item,), daemon=True)
               for item in ["first", *items]]
    try:
        threads[0].start()
        assert wait_for(lambda: "g" in gather._running, 30)
        for n, thread in enumerate(threads[1:], 1):
            thread.start()
            assert wait_for(lambda n=n: len(getattr(gather._gathering.get("g"), "items", ()))
                            == n, 30)
    finally:
        release.set()
        deadline = time.monotonic() + 30
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(thread.is_alive() for thread in threads), "a caller was left waiting"
    assert outcomes.pop("first") == "first done"
    return gather, outcomes


def test_an_error_in_a_batch_is_raised_to_every_caller_in_it_and_none_is_left_waiting(
        monkeypatch):
    recording(monkeypatch)
    error = peewee.OperationalError("database is locked")

    def run(group, items):
        raise error

    gather, outcomes = behind_a_running_batch(run, ["second", "third", "fourth"])
    assert outcomes == {"second": error, "third": error, "fourth": error}
    assert gather.idle()
    assert Gather(lambda group, items: items)("g", "next") == "next"


def test_a_leader_interrupted_mid_batch_gives_the_others_a_database_error(monkeypatch):
    recording(monkeypatch)
    interrupted = Interrupted()

    def run(group, items):
        raise interrupted

    gather, outcomes = behind_a_running_batch(run, ["second", "third"])
    assert outcomes["second"] is interrupted  # the leader: its own interruption
    assert isinstance(outcomes["third"], peewee.OperationalError)
    assert "interrupted" in str(outcomes["third"])
    assert gather.idle()


def test_a_leader_interrupted_before_its_batch_runs_leaves_nothing_for_later_callers(
        monkeypatch):
    """A gevent Timeout can strike while the leader pauses: the batch it was gathering
    must not stay behind for the next caller to join (and inherit the error of)."""
    interruptions = [Interrupted()]

    def pause():
        if interruptions:
            raise interruptions.pop()

    monkeypatch.setattr(batching, "pause", pause)
    runs = []
    gather = Gather(lambda group, items: (runs.append(list(items)), items)[1])
    with pytest.raises(Interrupted):
        gather("g", "interrupted")
    assert gather.idle()
    assert gather("g", "next") == "next"
    assert runs == [["next"]]
