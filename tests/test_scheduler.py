"""The fair scheduler (service/scheduler.py): which queued job a free slot gets, on SQLite and PostgreSQL;
priority and quotas at submit; the place in the queue; and, end to end, a job that overtakes a sweep."""

import threading
import time
from datetime import timedelta

import redis
from sqlalchemy import select, update
from sqlalchemy.orm import sessionmaker

from service import jobs, scheduler, workers
from service.models import Experiment, Sweep, WorkerPresence, utcnow
from service.settings import Settings
from tests.conftest import fresh_redis_broker, production_stack
from tests.support import eventually, wait_for_status
from tests.test_jobs import session  # noqa: F401  (a fixture: a session on SQLite and on PostgreSQL)

SPEC = {"kind": "ufm", "K": 3, "d": 4, "n_per_class": 2, "normalization": "normalized", "resources": "cpu"}


def submitted(session, owner: str, count: int = 1, priority: int = 0) -> list[str]:
    ids = [jobs.submit(session, SPEC, owner=owner, priority=priority).id for _ in range(count)]
    time.sleep(0.002)  # distinct creation times: "older" is well defined across calls
    return ids


def submitted_sweep(session, owner: str, count: int) -> list[str]:
    sweep = Sweep(id=f"sweep-{owner}", owner=owner, name=None, tags={}, definition={}, size=count,
                  created_at=utcnow())
    jobs.submit_sweep(session, sweep, [SPEC] * count)
    order = (Experiment.created_at, Experiment.id)
    return list(session.scalars(select(Experiment.id).where(Experiment.sweep == sweep.id).order_by(*order)))


class Broker:
    """What the rounds published, in order."""

    def __init__(self):
        self.sent: list[str] = []

    def __call__(self, outgoing):
        self.sent += [experiment_id for experiment_id, queue in outgoing if queue == "cpu"]


def round_of(session, broker: Broker, **overrides) -> list[str]:
    return scheduler.run_round(session, "cpu", Settings(**overrides), broker)


def run_to_end(session, experiment_id: str) -> None:
    claim = jobs.claim(session, experiment_id, worker="w")
    assert jobs.finish(session, experiment_id, claim.attempts, "succeeded", result={})


def test_a_free_slot_goes_to_the_owner_with_fewest_in_flight_then_priority_then_age(session):
    alice = submitted_sweep(session, "alice", 6)
    bob = submitted(session, "bob", 2)
    broker = Broker()
    assert round_of(session, broker) == []  # no worker serves the queue: nothing is sent

    workers.announce(session, "one-slot", ["cpu"], processes=1, gpus=None)
    # One slot: its running job and one waiting message. Both owners have none in flight: the older job, then bob.
    assert round_of(session, broker) == [alice[0], bob[0]]
    assert round_of(session, broker) == []  # the slot is full
    run_to_end(session, alice[0])
    assert round_of(session, broker) == [alice[1]]  # bob has one in flight, alice none
    run_to_end(session, bob[0])
    assert round_of(session, broker) == [bob[1]]  # alice has one in flight, bob none, though his job is newer
    run_to_end(session, alice[1])
    run_to_end(session, bob[1])
    # bob has nothing left: alice gets both places; an admin's urgent job of hers goes first among her own.
    urgent = submitted(session, "alice", priority=5)[0]
    assert round_of(session, broker) == [urgent, alice[2]]
    run_to_end(session, urgent)
    # Ties between owners go to the higher priority: carol's -1 loses to dave's 0 though older.
    carol = submitted(session, "carol", priority=-1)[0]
    dave = submitted(session, "dave")[0]
    run_to_end(session, alice[2])
    jobs.cancel_sweep(session, "sweep-alice")
    assert round_of(session, broker) == [dave, carol]
    assert broker.sent == [alice[0], bob[0], alice[1], bob[1], urgent, alice[2], dave, carol]
    sent = session.execute(select(Experiment.id, Experiment.send_count).where(Experiment.id.in_(broker.sent)))
    assert all(count == 1 for _id, count in sent)
    workers.withdraw(session, "one-slot")


def test_the_running_cap_holds_an_owner_back_and_a_dead_workers_slots_count_for_nothing(session):
    alice = submitted(session, "alice", 4)
    bob = submitted(session, "bob", 1)
    workers.announce(session, "four-slots", ["cpu"], processes=4, gpus=None)
    broker = Broker()
    # 8 places (4 slots, one ahead each), but alice may have only 2 in flight.
    assert round_of(session, broker, max_running_per_owner=2) == [alice[0], bob[0], alice[1]]
    run_to_end(session, alice[0])
    assert round_of(session, broker, max_running_per_owner=2) == [alice[2]]
    # The worker stops announcing: once its row is older than the heartbeat timeout, no slot is left.
    session.execute(update(WorkerPresence).values(seen_at=utcnow() - timedelta(seconds=61)))
    session.commit()
    assert round_of(session, broker) == []
    assert alice[3] not in broker.sent


def test_a_refused_publish_leaves_the_jobs_unsent_and_a_lost_message_is_still_resent(session):
    [job] = submitted(session, "alice")
    workers.announce(session, "one-slot", ["cpu"], processes=1, gpus=None)

    def broker_down(_outgoing):
        raise ConnectionError("broker down")

    assert round_of(session, broker_down) == []
    assert session.get(Experiment, job, populate_existing=True).sent_at is None  # a later round sends it
    broker = Broker()
    assert round_of(session, broker) == [job]
    # Its message is lost (a Redis that restarted empty): the reconciler re-sends it after RESEND_AFTER, as
    # under FIFO; meanwhile it holds its place in flight, so the slot gets no other job.
    session.execute(update(Experiment).where(Experiment.id == job)
                    .values(sent_at=utcnow() - timedelta(seconds=Settings().resend_after + 1)))
    session.commit()
    resent = []
    jobs.reconcile(session, Settings(), lambda experiment_id, queue: resent.append((experiment_id, queue)))
    assert resent == [(job, "cpu")]
    assert session.get(Experiment, job, populate_existing=True).send_count == 2


def test_two_rounds_at_once_send_no_more_jobs_than_the_slots_hold(session, monkeypatch):
    """Rounds run in several places at once (the API's dispatcher and reconciler, each worker after its jobs).
    Here one round stops between counting the jobs in flight and reading the queued ones, for up to a second,
    while another round runs to its end: on SQLite, whose reads outside a transaction each see the latest
    commit, it used to count none in flight, then find the other round's choices sent, and send the next two
    as well: four messages for a slot and its one ahead."""
    ada, bob = submitted(session, "ada", 2), submitted(session, "bob", 2)
    workers.announce(session, "one-slot", ["cpu"], processes=1, gpus=None)
    sessions = sessionmaker(session.get_bind(), expire_on_commit=False)
    counted, other_round_ended = threading.Event(), threading.Event()
    count_in_flight = scheduler.in_flight_by_owner

    def slow_count(connection, queue):
        in_flight = count_in_flight(connection, queue)
        if threading.current_thread().name == "slow round":
            counted.set()
            other_round_ended.wait(timeout=1.0)  # ends at once where the other round waits for this one
        return in_flight

    monkeypatch.setattr(scheduler, "in_flight_by_owner", slow_count)
    broker = Broker()
    sent_by_slow_round: list[str] = []

    def slow_round():
        with sessions() as own:
            sent_by_slow_round.extend(round_of(own, broker))

    thread = threading.Thread(target=slow_round, name="slow round")
    thread.start()
    assert counted.wait(timeout=30)
    with sessions() as own:
        sent_by_quick_round = round_of(own, broker)
    other_round_ended.set()
    thread.join(timeout=60)
    assert sorted(sent_by_slow_round + sent_by_quick_round) == sorted([ada[0], bob[0]])
    assert broker.sent == [ada[0], bob[0]]  # in the fair order, as one round would send them
    in_flight = session.scalars(select(Experiment.id).where(Experiment.sent_at.is_not(None)))
    assert sorted(in_flight) == sorted([ada[0], bob[0]])


def test_fair_order_interleaves_owners_and_stops_at_the_cap():
    now = utcnow()
    candidates = [scheduler.Candidate(f"a{i}", "alice", 0, now + timedelta(seconds=i)) for i in range(4)]
    candidates += [scheduler.Candidate("b0", "bob", 0, now + timedelta(seconds=10))]
    assert scheduler.fair_order(candidates, {"alice": 0, "bob": 2}, 5, None) == ["a0", "a1", "a2", "b0", "a3"]
    assert scheduler.fair_order(candidates, {"alice": 0, "bob": 2}, 5, 2) == ["a0", "a1"]
    assert scheduler.fair_order(candidates, {}, 2, None) == ["a0", "b0"]


def _problem(response) -> dict:
    assert response.headers["content-type"].startswith("application/problem+json")
    return response.json()


def test_priority_above_zero_is_for_admins_and_is_searchable(api_with):
    client = api_with(NCLAB_API_KEYS="alice:alice-key,root:root-key:admin").client
    alice = {"Authorization": "Bearer alice-key"}
    root = {"Authorization": "Bearer root-key"}
    refused = client.post("/experiments", json={"spec": SPEC, "priority": 5}, headers=alice)
    assert refused.status_code == 403
    detail = _problem(refused)["detail"]
    assert detail == "alice (member) may not submit with priority 5: a priority above 0 is for admins"
    sweep = {"base": SPEC, "grid": {"seed": [1, 2]}, "priority": 1}
    assert client.post("/sweeps", json=sweep, headers=alice).status_code == 403
    assert client.get("/experiments", headers=alice).json()["items"] == []  # nothing stored

    low = client.post("/experiments", json={"spec": SPEC, "priority": -3}, headers=alice)
    assert low.status_code == 202 and low.json()["priority"] == -3  # lowering one's own is anyone's
    urgent = client.post("/experiments", json={"spec": SPEC, "priority": 5}, headers=root)
    assert urgent.status_code == 202 and urgent.json()["priority"] == 5
    assert client.post("/sweeps", json=sweep, headers=root).status_code == 202
    out_of_range = client.post("/experiments", json={"spec": SPEC, "priority": 11}, headers=root)
    assert out_of_range.status_code == 422 and _problem(out_of_range)["errors"][0]["field"] == "priority"

    found = client.get("/experiments", params={"where": "priority > 0", "order_by": "-priority"}, headers=alice)
    assert [(item["owner"], item["priority"]) for item in found.json()["items"]] == [("root", 5)] + [("root", 1)] * 2
    openapi = client.get("/openapi.json", headers=alice).json()
    assert "403" in openapi["paths"]["/experiments"]["post"]["responses"]
    assert "429" in openapi["paths"]["/sweeps"]["post"]["responses"]


def test_a_submit_past_the_queued_quota_is_a_429_with_retry_after_and_stores_nothing(api_with):
    api = api_with(NCLAB_API_KEYS="alice:alice-key,bob:bob-key", NCLAB_MAX_QUEUED_PER_OWNER="3")
    client = api.client
    alice = {"Authorization": "Bearer alice-key"}
    assert client.post("/sweeps", json={"base": SPEC, "grid": {"seed": [1, 2]}}, headers=alice).status_code == 202
    too_many = client.post("/sweeps", json={"base": SPEC, "grid": {"seed": [3, 4]}}, headers=alice)
    assert too_many.status_code == 429 and int(too_many.headers["Retry-After"]) > 0
    assert "has 2 queued" in _problem(too_many)["detail"] and "NCLAB_MAX_QUEUED_PER_OWNER = 3" in too_many.text
    third = client.post("/experiments", json=SPEC, headers=alice)
    assert third.status_code == 202
    fourth = client.post("/experiments", json=SPEC, headers=alice)
    assert fourth.status_code == 429 and fourth.headers["Retry-After"]
    # Nothing of the refused ones was stored; bob's quota is his own.
    assert len(client.get("/experiments", params={"limit": 100}, headers=alice).json()["items"]) == 3
    assert len(client.get("/sweeps", headers=alice).json()["items"]) == 1
    assert client.post("/experiments", json=SPEC, headers={"Authorization": "Bearer bob-key"}).status_code == 202
    # Once one of alice's starts, she may queue one more.
    client.headers.update(alice)  # for the run's own read
    api.run(third.json()["id"])
    assert client.post("/experiments", json=SPEC, headers=alice).status_code == 202


def test_a_queued_experiment_says_its_place(api_with):
    from service.db import get_sessionmaker

    api = api_with(NCLAB_API_KEYS="alice:alice-key,bob:bob-key")
    client = api.client
    alice = {"Authorization": "Bearer alice-key"}
    bob = {"Authorization": "Bearer bob-key"}
    with get_sessionmaker()() as session:
        workers.announce(session, "one-slot", ["cpu"], processes=1, gpus=None)
    sweep = client.post("/sweeps", json={"base": SPEC, "grid": {"seed": list(range(6))}}, headers=alice).json()
    # Alice's first two take the slot's places (one running, one waiting); bob's is next.
    eventually(lambda: client.get(f"/sweeps/{sweep['id']}", headers=alice).json() and _sent(2), timeout=10,
               message="the scheduler did not fill the slot")
    answer = client.post("/experiments", json=SPEC, headers=bob).json()
    assert answer["place"] is None  # a poll's answer, not the submit's
    polled = client.get(f"/experiments/{answer['id']}", headers=bob).json()
    assert polled["place"]["of_owner"] == 1 and polled["place"]["owner_queued"] == 1
    third = client.get(f"/experiments/{sweep['members'][2]}", headers=alice).json()

    def next_is_bob():
        place = client.get(f"/experiments/{sweep['members'][2]}", headers=alice).json()["place"]
        return place if place["next_slot_owner"] == "bob" else None

    place = eventually(next_is_bob, timeout=5, message=f"the next slot is not bob's: {third['place']}")
    assert place == {"of_owner": 3, "owner_queued": 6, "next_slot_owner": "bob",
                     "text": "3rd of alice's 6; the next slot goes to bob"}
    # The dashboard's sign-in cookie, sent as the browser sends it (starlette deprecates per-request cookies).
    page = client.get(f"/ui/experiments/{sweep['members'][2]}", headers={"Cookie": "nclab_api_key=alice-key"})
    assert "3rd of alice&#39;s 6; the next slot goes to bob" in page.text
    client.headers.update(alice)  # for the run's own read
    api.run(sweep["members"][0])
    assert client.get(f"/experiments/{sweep['members'][0]}", headers=alice).json()["place"] is None  # finished
    with get_sessionmaker()() as session:
        workers.withdraw(session, "one-slot")


def _sent(count: int) -> bool:
    from service.db import get_sessionmaker

    with get_sessionmaker()() as session:
        return len(session.scalars(select(Experiment.id).where(Experiment.sent_at.is_not(None))).all()) >= count


# A solve of about a second on a quiet core (0.37 s per 800 steps): long enough to see the order in which jobs
# start. At 800 steps a quiet machine started the sweep's members faster than the test reads them.
SECOND_SPEC = {"kind": "ufm", "K": 20, "d": 32, "n_per_class": 30, "tol": 1e-300, "max_iters": 2400}


def test_bobs_job_overtakes_alices_queued_sweep_and_the_broker_holds_one_message_per_slot(pg_database, processes):
    """nclab api + one nclab worker (one slot) on PostgreSQL and Redis."""
    broker_url = fresh_redis_broker()
    broker = redis.Redis.from_url(broker_url)
    processes.env["NCLAB_API_KEYS"] = "alice:alice-key,bob:bob-key"
    alice, bob = {"Authorization": "Bearer alice-key"}, {"Authorization": "Bearer bob-key"}
    waiting: list[int] = []  # the cpu list's length: messages waiting for the one slot
    with production_stack(processes, pg_database, broker_url) as stack:
        client = stack.client
        eventually(lambda: 'nclab_queue_consumers{queue="cpu"} 1.0' in client.get("/metrics", headers=alice).text,
                   timeout=60, message="the worker never announced itself")
        sweep = client.post("/sweeps", json={"base": SECOND_SPEC, "grid": {"seed": list(range(8))}},
                            headers=alice).json()
        members = sweep["members"]
        client.headers.update(alice)
        wait_for_status(client, members[0], {"running"})
        for _ in range(10):
            waiting.append(broker.llen("cpu"))
            time.sleep(0.05)
        submitted_at = utcnow().isoformat()
        bobs = client.post("/experiments", json={**SECOND_SPEC, "seed": 99}, headers=bob).json()
        # Whose the next slot is, as read at most a second ago (scheduler.RECENT_SECONDS): bob's, as alice has
        # two jobs in flight (one running, one waiting) and he none; unless his job has left the queue already.
        def next_is_bobs() -> bool:
            place = client.get(f"/experiments/{bobs['id']}").json()["place"]
            return place is None or place["next_slot_owner"] == "bob"

        eventually(next_is_bobs, timeout=5, message="the next slot is not bob's")
        done = wait_for_status(client, bobs["id"], {"succeeded"}, timeout=120)
        for _ in range(10):
            waiting.append(broker.llen("cpu"))
            time.sleep(0.05)
        started = {member: client.get(f"/experiments/{member}").json()["started_at"] for member in members}
        assert stack.worker.poll() is None
    # One message ahead of the slot; two for the moment of a handover (the round after a job runs before the
    # worker takes the waiting message), never the sweep's eight.
    assert max(waiting) <= 2 and sum(count <= 1 for count in waiting) >= 0.75 * len(waiting), \
        f"messages waiting for one slot: {waiting}"
    # Between bob's submit and his start, at most one of alice's started: the one waiting for the slot.
    overtaken = [member for member, at in started.items() if at is not None and submitted_at < at < done["started_at"]]
    assert len(overtaken) <= 1, f"{len(overtaken)} of alice's started after bob's submit and before his job"
    assert sum(at is None for at in started.values()) >= 4  # FIFO would have started all of alice's first
