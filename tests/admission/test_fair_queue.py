"""The fair queue (app/admission/fair_queue.py): an upstream's cap, fair order across keys, bounds.

These run the queue itself against each database, in threads;
tests/admission/test_fair_queue_gateway.py runs it in gunicorn's workers, across gateway instances.
"""
import json
import re
import threading
import time
from unittest.mock import ANY

import pytest

from app import metrics
from app.admission import fair_queue
from app.admission.fair_queue import FIRST_ESTIMATE_SECONDS, FairQueue, GpuTimeTags, QueueTimeout
from app.errors import RateLimited
from app.keys.registry import KeyInfo
from app.store.models import QueueEntry
from tests.gateway_process import wait_for

UPSTREAM = "gpu"


@pytest.fixture
def make_queue(migrated):
    """make_queue(**settings) -> FairQueue; each one's keeper has stopped when the test ends."""
    made = []

    def make(**settings):  # fair by requests unless a test says otherwise: their orders
        made.append(FairQueue(**{"max_wait": 60, "fair": "requests", **settings}))
        return made[-1]

    yield make
    assert wait_for(lambda: all(q._keeper is None for q in made), 30), \
        "a queue's keeper never stopped"


@pytest.fixture
def queue(make_queue):
    return make_queue()


def key_info(make_key, name):
    _, row = make_key(name)
    return KeyInfo.from_row(row)


class Waiter(threading.Thread):
    """acquire() in a thread of its own; `.ticket` or `.error` once it returns."""

    def __init__(self, queue, key, cap=1, order=None):
        super().__init__(daemon=True)
        self.queue, self.key, self.cap, self.order = queue, key, cap, order
        self.ticket = self.error = None
        self.start()

    def run(self):
        try:
            self.ticket = self.queue.acquire(UPSTREAM, self.cap, self.key)
            if self.order is not None:
                self.order.append(self.key.name)
        except Exception as exc:
            self.error = exc


def waiting_count():
    return QueueEntry.select().where(QueueEntry.granted_at.is_null()).count()


def wait_until_waiting(n):
    assert wait_for(lambda: waiting_count() == n, 30), f"{waiting_count()} waiting, not {n}"


def serve_one_at_a_time(queue, waiters):
    """Let each waiter, as it is granted its slot, run alone and free it again."""
    pending = list(waiters)
    while pending:
        assert wait_for(lambda: any(w.ticket or w.error for w in pending), 30)
        served = next(w for w in pending if w.ticket or w.error)
        assert served.error is None, served.error
        served.join(30)
        pending.remove(served)
        queue.release(served.ticket)


def test_an_upstream_runs_at_most_its_cap_and_a_freed_slot_goes_to_the_next(queue, make_key):
    key = key_info(make_key, "a")
    first, second = queue.acquire(UPSTREAM, 2, key), queue.acquire(UPSTREAM, 2, key)
    third = Waiter(queue, key, cap=2)
    wait_until_waiting(1)
    assert third.ticket is None  # still waiting: two are running
    queue.release(first)
    third.join(30)
    assert third.ticket is not None and third.ticket.waited > 0
    queue.release(second)
    queue.release(third.ticket)
    queue.release(third.ticket)  # a second release does nothing
    assert QueueEntry.select().count() == 0


def test_a_key_with_one_request_goes_ahead_of_another_keys_backlog(queue, make_key):
    greedy, light = key_info(make_key, "greedy"), key_info(make_key, "light")
    running = queue.acquire(UPSTREAM, 1, greedy)
    order = []
    backlog = []
    for n in range(5):
        backlog.append(Waiter(queue, greedy, order=order))
        wait_until_waiting(n + 1)
    late = Waiter(queue, light, order=order)
    wait_until_waiting(6)
    queue.release(running)
    serve_one_at_a_time(queue, [*backlog, late])
    assert order[0] == "light", f"served in the order {order}"
    assert order[1:] == ["greedy"] * 5
    assert QueueEntry.select().count() == 0


def test_a_newcomer_interleaves_by_start_tag_with_a_key_served_for_a_while(queue, make_key):
    """Tags (S = max(V, the key's last finish), step 1/priority), steps chosen so that no
    two tags tie: "old" (priority 2) runs at 0 with 0.5 … 2.5 waiting; two of those are
    served, so V = 1.0. "new" (priority 3) then arrives with three: 1.0, 1.33, 1.67.
    Ahead of old's 1.5 … 2.5 only as far as its tags say, neither first nor last."""
    _, old_row = make_key("old", priority=2)
    _, new_row = make_key("new", priority=3)
    old, new = KeyInfo.from_row(old_row), KeyInfo.from_row(new_row)
    running = queue.acquire(UPSTREAM, 1, old)
    order, waiters = [], []
    for n in range(5):
        waiters.append(Waiter(queue, old, order=order))
        wait_until_waiting(n + 1)
    for _ in range(2):  # old is served for a while
        queue.release(running)
        assert wait_for(lambda: any(w.ticket for w in waiters), 30)
        served = next(w for w in waiters if w.ticket)
        served.join(30)
        waiters.remove(served)
        running = served.ticket
    for n in range(3):
        waiters.append(Waiter(queue, new, order=order))
        wait_until_waiting(4 + n)
    queue.release(running)
    serve_one_at_a_time(queue, waiters)
    assert order == ["old", "old", "new", "new", "old", "new", "old", "old"], order
    assert QueueEntry.select().count() == 0


def test_first_come_first_served_without_fairness(make_queue, make_key):
    queue = make_queue(fair=False)
    greedy, light = key_info(make_key, "greedy"), key_info(make_key, "light")
    running = queue.acquire(UPSTREAM, 1, greedy)
    order = []
    first = Waiter(queue, greedy, order=order)
    wait_until_waiting(1)
    second = Waiter(queue, light, order=order)
    wait_until_waiting(2)
    queue.release(running)
    first.join(30)
    queue.release(first.ticket)
    second.join(30)
    queue.release(second.ticket)
    assert order == ["greedy", "light"]


def test_a_key_whose_share_of_the_queue_is_full_gets_429_and_others_still_wait(
        make_queue, make_key):
    queue = make_queue(per_key=2, max_wait=60)
    greedy, light = key_info(make_key, "greedy"), key_info(make_key, "light")
    running = queue.acquire(UPSTREAM, 1, greedy)
    waiters = [Waiter(queue, greedy), Waiter(queue, greedy)]
    wait_until_waiting(2)
    with pytest.raises(RateLimited) as refused:
        queue.acquire(UPSTREAM, 1, greedy)
    assert refused.value.status == 429 and refused.value.refusal == "queue_full"
    assert "queue full" in refused.value.message and refused.value.headers["Retry-After"]
    other = Waiter(queue, light)
    wait_until_waiting(3)
    queue.release(running)
    serve_one_at_a_time(queue, [*waiters, other])
    assert QueueEntry.select().count() == 0


def test_a_request_that_waits_too_long_gets_503_and_leaves_the_queue(make_queue, make_key):
    queue = make_queue(max_wait=0.5)
    key = key_info(make_key, "a")
    running = queue.acquire(UPSTREAM, 1, key)
    with pytest.raises(QueueTimeout) as timed_out:
        queue.acquire(UPSTREAM, 1, key)
    assert timed_out.value.status == 503 and timed_out.value.headers["Retry-After"]
    assert "stayed busy" in timed_out.value.message
    assert waiting_count() == 0
    queue.release(running)
    assert QueueEntry.select().count() == 0


def test_a_crashed_workers_slots_lapse_with_their_lease(make_queue, make_key):
    key = key_info(make_key, "a")
    now = time.time()
    QueueEntry.create(upstream=UPSTREAM, key_id=key.id, holder="gone:1", start_tag=0,
                      finish_tag=1, enqueued_at=now - 120, granted_at=now - 120,
                      expires_at=now - 1)
    queue = make_queue()
    ticket = queue.acquire(UPSTREAM, 1, key)  # the lapsed entry holds nothing
    assert ticket.waited == 0.0
    queue.release(ticket)
    assert wait_for(lambda: queue._keeper is None, 30)


def test_a_waiting_request_is_granted_when_a_lapsed_slot_is_noticed(make_queue, make_key):
    """A worker that crashed while running frees its slot when its lease lapses."""
    key = key_info(make_key, "a")
    now = time.time()
    QueueEntry.create(upstream=UPSTREAM, key_id=key.id, holder="gone:1", start_tag=0,
                      finish_tag=1, enqueued_at=now, granted_at=now, expires_at=now + 1.5)
    queue = make_queue()
    waiter = Waiter(queue, key)
    assert wait_for(lambda: waiter.ticket is not None, 30), waiter.error
    assert waiter.ticket.waited >= 1.0
    queue.release(waiter.ticket)


def test_requests_arriving_together_enter_and_leave_in_few_statements_within_the_cap(
        queue, make_key, monkeypatch):
    """While one request's statement runs (a slow database here), the next gather and run
    as one: the cap still holds, fair order holds inside a batch, and every slot freed
    together is granted."""
    greedy, light = key_info(make_key, "greedy"), key_info(make_key, "light")
    batches = {"enter": slow_batches(queue._entering, monkeypatch),
               "leave": slow_batches(queue._leaving, monkeypatch)}
    order = []
    waiters = [Waiter(queue, greedy, cap=3, order=order) for _ in range(9)]
    wait_until_waiting(6)
    late = Waiter(queue, light, cap=3, order=order)
    wait_until_waiting(7)
    assert sum(batches["enter"]) == 10 and len(batches["enter"]) < 10
    assert wait_for(lambda: sum(w.ticket is not None for w in waiters) == 3, 30)
    running = [w for w in waiters if w.ticket is not None]
    assert QueueEntry.select().count() == 10
    releases = [threading.Thread(target=queue.release, args=(w.ticket,)) for w in running]
    for thread in releases:
        thread.start()
    for thread in releases:
        thread.join(30)
    assert len(batches["leave"]) < 3
    assert wait_for(lambda: sum(bool(w.ticket) for w in [*waiters, late]) == 6, 30)
    assert late.ticket is not None, f"served in the order {order}"  # ahead of the backlog
    serve_one_at_a_time(queue, [w for w in [*waiters, late] if w not in running])
    assert QueueEntry.select().count() == 0
    assert queue._entering.idle() and queue._leaving.idle()


def slow_batches(gather, monkeypatch, seconds=0.2):
    """Make each of the gather's batches take `seconds`; the list of their sizes."""
    sizes = []
    run = gather._run

    def slow(group, items):
        sizes.append(len(items))
        time.sleep(seconds)
        return run(group, items)

    monkeypatch.setattr(gather, "_run", slow)
    return sizes


def test_without_fairness_requests_entering_together_are_served_in_arrival_order(
        make_queue, make_key, monkeypatch):
    queue = make_queue(fair=False)
    keys = [key_info(make_key, f"k{i}") for i in range(6)]
    running = queue.acquire(UPSTREAM, 1, keys[0])
    sizes = slow_batches(queue._entering, monkeypatch)
    order = []
    waiters = [Waiter(queue, key, order=order) for key in keys]
    wait_until_waiting(6)
    assert max(sizes) > 1  # some entered in one batch
    names = {key.id: key.name for key in keys}
    entries = list(QueueEntry.select(QueueEntry.key_id, QueueEntry.enqueued_at)
                   .where(QueueEntry.granted_at.is_null()).order_by(QueueEntry.enqueued_at)
                   .tuples())
    assert len({at for _, at in entries}) == 6  # each keeps the moment it arrived
    arrived = [names[key_id] for key_id, _ in entries]
    queue.release(running)
    serve_one_at_a_time(queue, waiters)
    assert order == arrived


def served_by_priority(queue, make_key, priority, lows, highs):
    """Key "low" (priority 1) runs one request, then waits with `lows` more; key "high"
    (`priority`) then waits with `highs`: the order they are served in, one at a time."""
    _, low_row = make_key("low")
    _, high_row = make_key("high", priority=priority)
    low, high = KeyInfo.from_row(low_row), KeyInfo.from_row(high_row)
    running = queue.acquire(UPSTREAM, 1, low)
    order, waiters = [], []
    for n, key in enumerate([low] * lows + [high] * highs):
        waiters.append(Waiter(queue, key, order=order))
        wait_until_waiting(n + 1)
    queue.release(running)
    serve_one_at_a_time(queue, waiters)
    return order


def test_a_key_with_priority_2_gets_twice_the_slots_of_a_key_with_1(queue, make_key):
    order = served_by_priority(queue, make_key, 2, lows=4, highs=4)
    assert order[:6].count("high") == 4, f"served in the order {order}"


def test_a_key_with_priority_3_is_served_three_requests_to_one_of_a_key_with_1(queue, make_key):
    """Steps 1/priority, chosen so that no two tags tie (a tie goes by the random entry id):
    "low" (priority 1) runs at 0 with 1 and 2 waiting; "high" (priority 3) then waits with
    0, 0.33 and 0.67, all three ahead of low's next. Unweighted, high's 1 and 2 would tie
    with low's, and no order of the ties is this one."""
    order = served_by_priority(queue, make_key, 3, lows=2, highs=3)
    assert order == ["high", "high", "high", "low", "low"], f"served in the order {order}"
    assert QueueEntry.select().count() == 0


def test_the_queue_command_shows_running_and_waiting_requests_by_key(make_key, runner):
    """What two gateways' workers hold, as the rows they write (no worker runs here: the
    in-process CLI rebinds the database a running queue keeper would be using)."""
    key = key_info(make_key, "batch")
    now = time.time()
    for holder, granted_at in [("gw1:10", now - 5), ("gw2:20", None)]:
        QueueEntry.create(upstream=UPSTREAM, key_id=key.id, holder=holder, start_tag=0,
                          finish_tag=1, enqueued_at=now - 5, granted_at=granted_at,
                          expires_at=now + 60)
    shown = runner("queue")
    assert shown.exit_code == 0
    assert re.search(rf"^{UPSTREAM}\s+-\s+{key.prefix}\s+1\s+1\s+5\.\d", shown.output,
                     re.M), shown.output
    assert json.loads(runner("queue", "--json").stdout) == [
        {"upstream": UPSTREAM, "max_concurrent": None, "key": key.prefix, "key_id": key.id,
         "running": 1, "waiting": 1, "longest_wait_s": ANY}]
    QueueEntry.delete().execute()
    assert "No requests running or waiting" in runner("queue").output


def test_priority_is_a_key_setting_from_1_to_100(runner):
    made = json.loads(runner("keys", "add", "--name", "batch", "--priority", "3", "--json").stdout)
    assert made["priority"] == 3
    assert runner("keys", "update", "batch", "--priority", "0").exit_code != 0
    assert runner("keys", "update", "batch", "--priority", "1").exit_code == 0
    assert json.loads(runner("keys", "show", "batch", "--json").stdout)["priority"] == 1


def test_waits_and_waiting_requests_show_in_the_metrics(queue, make_key):
    key = key_info(make_key, "measured")
    running = queue.acquire(UPSTREAM, 1, key)
    waiter = Waiter(queue, key)
    wait_until_waiting(1)
    labels = f'key="{key.prefix}",upstream="{UPSTREAM}"'
    # The gauge goes up just after the entry is in the table.
    assert wait_for(lambda: f"ollama_gw_queue_waiting{{{labels}}} 1.0"
                    in metrics.exposition()[0].decode(), 30)
    queue.release(running)
    serve_one_at_a_time(queue, [waiter])
    text = metrics.exposition()[0].decode()
    assert f"ollama_gw_queue_waiting{{{labels}}} 0.0" in text
    assert f"ollama_gw_queue_wait_seconds_count{{{labels}}} 2.0" in text


# -- a request that may run on any of several upstreams (acquire_any)

BOTH = [("gpu-a", 1), ("gpu-b", 1)]


class AnyWaiter(threading.Thread):
    """acquire_any(BOTH) in a thread of its own: `.result` (index, ticket) or `.error`."""

    def __init__(self, queue, key, choices=BOTH):
        super().__init__(daemon=True)
        self.queue, self.key, self.choices = queue, key, choices
        self.result = self.error = None
        self.start()

    def run(self):
        try:
            self.result = self.queue.acquire_any(self.choices, self.key)
        except Exception as exc:
            self.error = exc


def entries(upstream):
    return [(row.key_id, row.granted_at is not None)
            for row in QueueEntry.select().where(QueueEntry.upstream == upstream)]


def test_any_runs_on_the_first_free_choice_and_enters_no_other_queue(queue, make_key):
    key = key_info(make_key, "agent")
    first = queue.acquire_any(BOTH, key)
    assert first[0] == 0 and first[1].upstream == "gpu-a"  # both free: the first, best
    second = queue.acquire_any(BOTH, key)
    assert second[0] == 1 and second[1].upstream == "gpu-b"  # gpu-a full: gpu-b, no wait
    assert second[1].waited == 0.0
    assert entries("gpu-a") == [(key.id, True)] and entries("gpu-b") == [(key.id, True)]
    queue.release(first[1])
    queue.release(second[1])
    assert QueueEntry.select().count() == 0


def test_any_waits_in_both_queues_and_takes_the_first_slot_freed(queue, make_key):
    key = key_info(make_key, "agent")
    a, b = queue.acquire(*BOTH[0], key), queue.acquire(*BOTH[1], key)
    waiter = AnyWaiter(queue, key)
    wait_until_waiting(2)  # one entry in each queue
    queue.release(b)
    assert wait_for(lambda: waiter.result is not None, 30), waiter.error
    assert waiter.result[0] == 1 and waiter.result[1].upstream == "gpu-b"
    # It left gpu-a's queue: a slot freed there goes to no one.
    assert entries("gpu-a") == [(key.id, True)]
    queue.release(a)
    queue.release(waiter.result[1])
    assert QueueEntry.select().count() == 0


def test_any_hands_on_a_second_grant_it_does_not_use(queue, make_key):
    """Both queues grant it at once: it runs on one, and the other slot goes to the next."""
    key, other = key_info(make_key, "agent"), key_info(make_key, "other")
    # `other` holds both slots, so its next requests come after `key`'s (fair order).
    a, b = queue.acquire(*BOTH[0], other), queue.acquire(*BOTH[1], other)
    waiter = AnyWaiter(queue, key)
    wait_until_waiting(2)
    next_at = [AnyWaiter(queue, other, choices=[choice]) for choice in BOTH]
    wait_until_waiting(4)
    queue.release(a)
    queue.release(b)
    assert wait_for(lambda: waiter.result is not None, 30), waiter.error
    index, ticket = waiter.result
    # While it runs, the slot it did not use is the other key's, at once.
    assert wait_for(lambda: next_at[1 - index].result is not None, 30)
    assert next_at[index].result is None
    assert next_at[1 - index].result[1].upstream == BOTH[1 - index][0]
    queue.release(ticket)
    assert wait_for(lambda: next_at[index].result is not None, 30)
    for waiting in next_at:
        queue.release(waiting.result[1])
    assert QueueEntry.select().count() == 0


def test_any_leaves_every_queue_when_it_gives_up(make_queue, make_key):
    queue = make_queue(max_wait=0.5)
    key = key_info(make_key, "agent")
    a, b = queue.acquire(*BOTH[0], key), queue.acquire(*BOTH[1], key)
    with pytest.raises(QueueTimeout, match="gpu-a, gpu-b stayed busy"):
        queue.acquire_any(BOTH, key)
    assert waiting_count() == 0
    queue.release(a)
    queue.release(b)


def test_any_with_an_uncapped_upstream_to_go_to_never_waits(queue, make_key):
    key = key_info(make_key, "agent")
    a, b = queue.acquire(*BOTH[0], key), queue.acquire(*BOTH[1], key)
    assert queue.acquire_any(BOTH, key, elsewhere=True) == (None, None)
    assert waiting_count() == 0
    queue.release(a)
    queue.release(b)


def test_any_skips_a_queue_where_the_keys_share_is_full(make_queue, make_key):
    queue = make_queue(per_key=1)
    key = key_info(make_key, "agent")
    a, b = queue.acquire(*BOTH[0], key), queue.acquire(*BOTH[1], key)
    first = AnyWaiter(queue, key, choices=[("gpu-a", 1)])  # its one place at gpu-a
    wait_until_waiting(1)
    second = AnyWaiter(queue, key)  # gpu-a's share full: waits at gpu-b only
    wait_until_waiting(2)
    assert [u for u in ("gpu-a", "gpu-b") if (key.id, False) in entries(u)] == ["gpu-a", "gpu-b"]
    with pytest.raises(RateLimited):  # full in both
        queue.acquire_any(BOTH, key)
    queue.release(b)
    assert wait_for(lambda: second.result is not None, 30)
    assert second.result[1].upstream == "gpu-b"
    queue.release(a)
    assert wait_for(lambda: first.result is not None, 30)
    queue.release(first.result[1])
    queue.release(second.result[1])
    assert wait_for(lambda: QueueEntry.select().count() == 0, 30)


# -- queue_fair = "gpu_time": keys share an upstream's time, not its request count

def test_gpu_time_tags_charge_an_estimate_and_correct_it_on_the_next_request():
    tags = GpuTimeTags()
    assert tags.step(7, "gpu", entry_id=1) == FIRST_ESTIMATE_SECONDS  # nothing timed yet
    tags.ran(1, "gpu", 0.25)  # held its slot 0.25 s: charged 0.75 s too much
    # The next is charged its estimate (0.25 s: all there is) less at most that much of
    # what was overcharged.
    assert tags.step(7, "gpu", entry_id=2) == pytest.approx(0.001)
    tags.ran(2, "gpu", 0.3)  # 0.05 s more than charged: added to the next
    assert tags.step(7, "gpu", entry_id=3) == pytest.approx(0.25 + 0.3 * (0.3 - 0.25) + 0.05)
    # Another key new to the upstream is charged what the upstream's requests take.
    assert tags.step(8, "gpu", entry_id=4) == pytest.approx(0.25 + 0.3 * (0.3 - 0.25))
    assert tags.step(7, "other", entry_id=5) == FIRST_ESTIMATE_SECONDS  # another upstream
    tags.ran(5, "other", None)  # never ran: nothing learnt, nothing owed
    assert tags.step(7, "other", entry_id=6) == FIRST_ESTIMATE_SECONDS


def test_a_request_that_never_runs_leaves_its_keys_debt_to_the_next():
    """Leaving the queue (a timeout, a hang-up, the unused place of a request waiting at
    two upstreams) must not wipe out what the key owes or is owed."""
    tags = GpuTimeTags()
    tags.step(7, "gpu", entry_id=1)
    tags.ran(1, "gpu", 0.25)  # overcharged 0.75 s: the next ones are owed it
    assert tags.step(7, "gpu", entry_id=2) == pytest.approx(0.001)
    tags.ran(2, "gpu", None)  # it left without running
    assert tags.step(7, "gpu", entry_id=3) == pytest.approx(0.001)  # still owed


def test_gpu_time_estimate_follows_the_keys_recent_requests():
    tags = GpuTimeTags()
    for entry_id in range(1, 30):
        tags.step(7, "gpu", entry_id)
        tags.ran(entry_id, "gpu", 2.0)
    assert tags.step(7, "gpu", entry_id=30) == pytest.approx(2.0, rel=0.01)


def share_of_time(queue, make_key, holds, seconds, warm_up=1.5):
    """Two greedy keys at a one-slot upstream, three clients each, each request holding
    the slot holds[key] s: the share of the slot's time each key got once the queue has
    timed a few of their requests (after `warm_up` s)."""
    used = dict.fromkeys(holds, 0.0)
    counted_from = time.monotonic() + warm_up
    deadline = counted_from + seconds
    errors = []

    def client(key, hold):
        try:
            while time.monotonic() < deadline:
                ticket = queue.acquire(UPSTREAM, 1, key)
                time.sleep(hold)
                queue.release(ticket)
                if time.monotonic() - hold >= counted_from:
                    used[key.name] += hold
        except Exception as exc:
            errors.append(exc)

    keys = {name: key_info(make_key, name) for name in holds}
    clients = [threading.Thread(target=client, args=(keys[name], hold))
               for name, hold in holds.items() for _ in range(3)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(seconds + 60)
    assert not errors and not any(t.is_alive() for t in clients), errors
    total = sum(used.values())
    return {name: round(value / total, 2) for name, value in used.items()}


def test_gpu_time_fairness_gives_a_long_and_a_short_key_equal_time(make_queue, make_key):
    share = share_of_time(make_queue(fair="gpu_time"), make_key,
                          {"long": 0.2, "short": 0.02}, seconds=3)
    assert 0.35 <= share["long"] <= 0.65, share


def test_request_fairness_gives_the_long_key_most_of_the_time(make_queue, make_key):
    share = share_of_time(make_queue(fair="requests"), make_key,
                          {"long": 0.2, "short": 0.02}, seconds=3)
    assert share["long"] >= 0.85, share  # equal requests: 0.2 / 0.22 of the time


def test_freeing_a_slot_does_not_pause_first_entering_does(queue, make_key, monkeypatch):
    """A freed slot idles until the statement that hands it on runs: that one starts at
    once. Entering pauses once, so that requests arriving together enter in one go."""
    from app.store import batching

    paused = []
    monkeypatch.setattr(batching, "pause", lambda: paused.append("pause"))
    key = KeyInfo.from_row(make_key("a")[1])
    ticket = queue.acquire("gpu", 1, key)
    assert paused == ["pause"]
    queue.release(ticket)
    assert paused == ["pause"]


def test_slots_granted_together_are_announced_in_fair_order(queue, make_key, monkeypatch):
    """Three slots free at once: the waiting requests are woken smallest tag first (the
    database hands back the rows it updated in an order of its own)."""
    from app.store.db import is_postgres

    if is_postgres():
        pytest.skip("PostgreSQL's function names its grants itself (migration 0015)")
    key = KeyInfo.from_row(make_key("a")[1])
    now = time.time()
    # Ids against the tags' order, so that a table scan would give the reverse.
    for entry_id, tag in [(300, 1.0), (200, 2.0), (100, 3.0), (50, 4.0)]:
        QueueEntry.create(id=entry_id, upstream="gpu", key_id=key.id, holder="elsewhere/1",
                          start_tag=tag, finish_tag=tag + 1, enqueued_at=now,
                          expires_at=now + 60)
    announced = []
    monkeypatch.setattr(queue, "_announce", announced.extend)
    queue.dispatch_all([("gpu", 3)])
    assert [entry_id for entry_id, _ in announced] == [300, 200, 100]
    assert QueueEntry.get_by_id(50).granted_at is None


def test_a_second_release_of_a_ticket_asks_nothing_of_the_database(queue, make_key,
                                                                    monkeypatch):
    key = key_info(make_key, "a")
    ticket = queue.acquire(UPSTREAM, 1, key)
    queue.release(ticket)
    left = []
    monkeypatch.setattr(queue, "_leaving", lambda group, entry_id: left.append(entry_id))
    queue.release(ticket)
    assert left == [] and ticket.entry_id is None


def test_a_running_request_keeps_its_slot_past_its_lease_while_its_worker_renews_it(
        make_queue, make_key):
    """The lease only bounds what a crashed worker holds: a live one renews it, and a
    request running longer than the lease still counts against the cap."""
    queue, other = make_queue(lease_seconds=3), make_queue(max_wait=0.5)
    key = key_info(make_key, "a")
    ticket = queue.acquire(UPSTREAM, 1, key)
    leased_until = QueueEntry.get_by_id(ticket.entry_id).expires_at
    assert wait_for(lambda: time.time() > leased_until + 3, 30)  # lapsed, unless renewed
    with pytest.raises(QueueTimeout):  # the slot is still taken: another request waits
        other.acquire(UPSTREAM, 1, key)
    queue.release(ticket)
    assert QueueEntry.select().count() == 0


def test_a_release_hands_on_a_slot_whatever_lapsed_entries_remain(make_queue, make_key,
                                                                    monkeypatch):
    """A crashed worker's entry, lapsed but not yet cleared away, holds no slot: the one a
    release frees goes to the next request at once, not at the keeper's next look for
    lapsed slots (DISPATCH_SECONDS, set far off here)."""
    monkeypatch.setattr(fair_queue, "DISPATCH_SECONDS", 600)
    key = key_info(make_key, "a")
    now = time.time()
    QueueEntry.create(upstream=UPSTREAM, key_id=key.id, holder="gone:1", start_tag=0,
                      finish_tag=1, enqueued_at=now - 120, granted_at=now - 120,
                      expires_at=now - 1)
    queue = make_queue(max_wait=30)
    running = queue.acquire(UPSTREAM, 1, key)
    waiter = Waiter(queue, key)
    wait_until_waiting(1)
    queue.release(running)
    waiter.join(60)  # past max_wait: the thread has ended either way
    assert waiter.ticket is not None, waiter.error
    assert waiter.ticket.waited < 15
    queue.release(waiter.ticket)


def test_an_entry_swept_away_as_it_enters_ends_in_a_503_not_an_error(make_queue, make_key,
                                                                     monkeypatch):
    """Cleared away between its insert and the look whether it was granted: it waits, and
    the keeper's next look ends the wait (a TypeError, a 500, before)."""
    queue = make_queue(max_wait=30)
    key = key_info(make_key, "a")
    running = queue.acquire(UPSTREAM, 1, key)
    dispatch = queue._dispatch

    def swept_first(*args):
        QueueEntry.delete().where(QueueEntry.granted_at.is_null()).execute()
        dispatch(*args)

    monkeypatch.setattr(queue, "_dispatch", swept_first)
    waiter = Waiter(queue, key)
    waiter.join(60)  # past max_wait: the thread has ended either way
    assert isinstance(waiter.error, QueueTimeout), waiter.error
    queue.release(running)


def test_a_waiting_request_whose_entry_vanished_gives_up_at_the_next_look(make_queue,
                                                                           make_key):
    """Its entry lapsed (its worker stalled past the lease) and another worker cleared it
    away: no slot will come, and the request hears so at the keeper's next look rather
    than after queue_max_wait_seconds."""
    queue = make_queue(max_wait=30)
    key = key_info(make_key, "a")
    running = queue.acquire(UPSTREAM, 1, key)
    waiter = Waiter(queue, key)
    assert wait_for(lambda: waiting_count() == 1 and queue._waits, 30)  # waits, not entering
    started = time.monotonic()
    QueueEntry.delete().where(QueueEntry.granted_at.is_null()).execute()
    waiter.join(60)  # past max_wait: the thread has ended either way
    assert isinstance(waiter.error, QueueTimeout), waiter.error
    assert time.monotonic() - started < 15
    queue.release(running)
