"""Work that arrives while the same work runs waits, then runs as one batch
(app/store/batching.py)."""
import threading

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
