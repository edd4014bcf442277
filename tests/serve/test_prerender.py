"""While a meeting goes on, ``melter serve`` submits prerender jobs for it.

Real Redis and the real tracker with the fixture meeting's own Janus events: a prerender job
every ``MELTER_PRERENDER_SECONDS`` of the meeting, only once the previous one ended, each the
meeting's own render (same outputs, layout and inputs) marked ``prerender``; none once the
room is destroyed, and the meeting's render after it is the usual one.
"""

from __future__ import annotations

import json

from melter.farm.jobs import Farm
from melter.serve.config import load_settings
from melter.serve.rooms import parse_events
from melter.serve.tracker import Tracker
from tests.helpers.farm import FarmHarness
from tests.helpers.service import copy_recordings, event_lines, farm

__all__ = ["farm"]  # the fixture, used by name

EVERY = 20.0


def test_prerenders_while_the_meeting_goes_on_and_none_after(farm: FarmHarness) -> None:
    copy_recordings(farm, ["dev-three-party-vp8"])
    settings = load_settings({**farm.env, "MELTER_PRERENDER_SECONDS": str(EVERY)})
    client = Farm(farm.config)
    tracker = Tracker(settings, client)
    events = [e for line in event_lines("dev-three-party-vp8")
              for e in parse_events(json.loads(line))]
    going = [e for e in events if e.kind != "destroyed"]
    first = min(e.ts for e in events) / 1e6
    assert tracker.handle(going, now=first + 1) == []
    assert tracker.r.smembers(f"{tracker.p}:live") == {"2001"}

    assert tracker.prerender_live(now=first + EVERY - 0.5) == []  # not yet
    [one] = tracker.prerender_live(now=first + EVERY)
    job = client.status(one)
    assert job["spec"]["prerender"] is True and job["priority"] == "auto"
    assert job["spec"]["idempotency_key"].endswith(":pre:1")
    state = tracker.room("2001")
    assert state is not None
    usual = tracker._spec(state, state.meetings[0])
    assert job["outputs"] == [o["path"] for o in usual["outputs"]]  # no name reserved
    assert job["spec"]["inputs"] == usual["inputs"]
    final_layout = client.status(client.submit({**usual, "idempotency_key": "probe"}))
    assert job["spec"]["layout"] == final_layout["spec"]["layout"]
    client.cancel(final_layout["id"])
    # Not while the last one is still queued, however long ago it was submitted.
    assert tracker.prerender_live(now=first + 2 * EVERY) == []
    assert tracker.prerender_live(now=first + 4 * EVERY) == []
    client.cancel(one)
    [two] = tracker.prerender_live(now=first + 4 * EVERY)
    assert tracker.prerender_live(now=first + 5 * EVERY - 0.5) == []  # every EVERY at most
    assert client.status(two)["spec"]["idempotency_key"].endswith(":pre:2")
    client.cancel(two)

    destroyed = [e for e in events if e.kind == "destroyed"]
    ended = tracker.handle(destroyed, now=first + 7 * EVERY)
    assert len(ended) == 1
    assert tracker.r.smembers(f"{tracker.p}:live") == set()
    assert tracker.prerender_live(now=first + 20 * EVERY) == []
    [final] = tracker.submit_pending(now=first + 8 * EVERY)
    spec = client.status(final)["spec"]
    assert not spec.get("prerender") and not spec["idempotency_key"].endswith(":pre:2")
    assert tracker.stats()["prerenders_submitted"] == 2
