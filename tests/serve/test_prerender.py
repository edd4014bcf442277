"""While a meeting goes on, ``melter serve`` submits prerender jobs for it, and a restart of
the service in the middle loses none of the chunks they rendered.

Real Redis and the real tracker with the fixture meeting's own Janus events: a prerender job
every ``MELTER_PRERENDER_SECONDS`` of the meeting, only once the previous one ended, each the
meeting's own render (same outputs, layout and inputs) marked ``prerender``; none once the
room is destroyed, and the meeting's render after it is the usual one.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from melter.farm.jobs import Farm
from melter.farm.runner import PARTS_DIR
from melter.serve.config import load_settings
from melter.serve.rooms import parse_events
from melter.serve.tracker import Tracker
from tests.helpers.farm import FarmHarness
from tests.helpers.service import CLI, Service, copy_recordings, event_lines, farm

__all__ = ["farm"]  # the fixture, used by name

EVERY = 20.0
FIXTURES = Path(__file__).parent.parent / "fixtures"


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
    assert job["spec"]["prerender"] is True and job["priority"] == "live"
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


def test_a_service_killed_mid_meeting_keeps_the_chunks_rendered_before(
        farm: FarmHarness) -> None:
    """A meeting replayed live (``melter replay``) to ``melter serve`` and two workers, in
    5 s chunks prerendered every 2 s; the service is killed (SIGKILL) once chunks are kept and
    started again. The meeting's render after its destroy uses the chunks kept before the
    kill, and the prerenders go on after the restart (their count carries on in Redis)."""
    farm.env.update({"MELTER_PRERENDER_SECONDS": "2", "MELTER_AUTO_CHUNK_SECONDS": "5"})
    farm.start_workers(["w1", "w2"])
    service = Service(farm)
    service.start()
    room = "7301"
    renders = farm.storage / "renders"
    parts = renders / PARTS_DIR
    replaying = subprocess.Popen(
        [sys.executable, "-c", CLI, "replay", str(FIXTURES / "dev-turn-taking-vp8"), "--into",
         str(farm.storage / "recordings"), "--events", f"{service.url}/janus/events",
         "--room", room], env=farm.env, cwd=farm.base, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (parts.exists() and list(parts.glob("*.mp4"))):
            assert time.monotonic() < deadline and replaying.poll() is None, "no chunk kept"
            time.sleep(0.1)
        before = {p.name for p in parts.glob("*.mp4")}
        service.kill()
        assert replaying.poll() is None, "the meeting ended before the kill"
        time.sleep(1.0)
        service.start()
        output, _ = replaying.communicate(timeout=120)
        # The posts made while the service was down failed (Janus's handler drops them too);
        # the room's destroy, at the end, reached the service started again.
        lost = re.search(r"URLError: (\d+)", output)
        assert replaying.returncode == (1 if lost else 0), output
        assert lost is None or int(lost[1]) <= 5, output
        client = Farm(farm.config)

        def final() -> list[dict]:
            return [j for j in client.jobs(limit=200)
                    if j["spec"].get("room") == room and not j["spec"].get("prerender")]

        deadline = time.monotonic() + 120
        while not (final() and final()[0]["state"] in ("done", "failed")):
            assert time.monotonic() < deadline, "no render of the meeting"
            time.sleep(0.2)
        [job] = final()
        assert job["state"] == "done", job
        prerenders = [j for j in client.jobs(limit=200)
                      if j["spec"].get("room") == room and j["spec"].get("prerender")]
    finally:
        if replaying.poll() is None:
            replaying.kill()
        service.stop()
    counts = sorted(int(j["spec"]["idempotency_key"].rsplit(":", 1)[1]) for j in prerenders)
    assert counts == list(range(1, len(counts) + 1)) and len(counts) >= 3, counts
    manifest = json.loads(Path(job["outputs"][0] + ".manifest.json").read_text())
    chunks = manifest["timings"]["chunks"]
    kept = [c for c in chunks if c["kept"]]
    print(f"{len(counts)} prerenders; {len(before)} chunk(s) kept before the kill; "
          f"{len(kept)} of {len(chunks)} chunks kept in the render")
    assert len(kept) >= len(before) >= 1
    assert [c["kept"] for c in chunks[:len(before)]] == [True] * len(before)
    assert not parts.exists()  # used up by the join
