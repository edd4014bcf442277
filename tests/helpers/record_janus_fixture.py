"""Record a real Janus meeting as a test fixture:
``python -m tests.helpers.record_janus_fixture NAME``.

Runs one scripted meeting (:data:`SCENARIOS`) through the end-to-end harness (``janus_e2e``:
Janus 1.1.2 in a network namespace, aiortc publishers, an :class:`EventReceiver` for the sample
event handler's posts), then writes ``tests/fixtures/NAME/``: the room's ``.mjr`` files exactly
as Janus wrote them, ``events.jsonl`` (every event posted, one JSON object a line) and
``manifest.json`` (what each publisher sent and when, and the facts of each file read from its
own bytes). Needs root (see ``janus_e2e.skip_reason``).

Every publisher carries sync markers: for 100 ms at every 5 s of its media clock its picture is
white and its tone doubled. After recording, each file is inspected (``melter inspect``) and
each participant's audio and video are merged (``melter convert``) and measured: every white
flash must start within :data:`SYNC_TOLERANCE_S` of its tone doubling, 5 s after the one
before. ``--check NAME`` repeats only these checks on a recorded fixture.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import itertools
import json
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.helpers.janus_e2e import (
    DEFAULT_PEOPLE,
    FLASH_S,
    MARKER_PERIOD_S,
    EventReceiver,
    Janus,
    MeetingLog,
    Person,
    event_counts,
    http_json,
    melter_env,
    network_namespace,
    run_meeting,
    skip_reason,
)

FIXTURES = Path(__file__).parent.parent / "fixtures"
#: Flash and tone doubling of one marker may be this far apart in a converted file.
SYNC_TOLERANCE_S = 0.015
#: A fixture folder should stay under this size.
MAX_FOLDER_BYTES = 5_000_000


@dataclass(frozen=True)
class Scenario:
    description: str
    room: int
    people: tuple[Person, ...]
    destroy_at: float
    #: what happens, for the fixtures' README
    summary: str


def _person(base: Person, pid: int, join_at: float, **changes: Any) -> Person:
    """One of the end-to-end test's people (colour, tone) with another id and schedule."""
    fields: dict[str, Any] = {"unpublish_at": None, "leave_at": None, "markers": True}
    fields.update(changes)
    return dataclasses.replace(base, pid=pid, join_at=join_at, **fields)


X, Y, Z = DEFAULT_PEOPLE
#: A fourth participant: green, 600 Hz.
W = Person("W", 104, (60, 200, 60), 600.0, 0.0)

SCENARIOS = {
    "janus-10fps-vp8": Scenario(
        "three-party VP8+Opus at 10 fps with sync markers; Y leaves, room destroyed while X "
        "and Z still publish",
        2004,
        (_person(X, 541, 0.0, fps=10), _person(Y, 542, 3.0, fps=10, leave_at=16.0),
         _person(Z, 543, 6.0, fps=10)),
        22.0,
        "X from 0 s; Y joins ~3 s and leaves ~16 s; Z joins ~6 s; the admin destroys the room "
        "at ~22 s while X and Z still publish. All 320x240 at 10 fps.",
    ),
    "janus-30fps-h264": Scenario(
        "three-party H.264+Opus at 30 fps with sync markers (Y at 640x360); room destroyed "
        "while all publish",
        2005,
        (_person(X, 551, 0.0, fps=30, codec="h264"),
         _person(Y, 552, 2.5, fps=30, codec="h264", size=(640, 360)),
         _person(Z, 553, 5.5, fps=30, codec="h264")),
        21.0,
        "X from 0 s; Y joins ~2.5 s; Z joins ~5.5 s; the admin destroys the room at ~21 s "
        "while all three publish. 30 fps; X and Z 320x240, Y 640x360.",
    ),
    "janus-mixed-fps-vp8": Scenario(
        "four-party VP8+Opus at 6, 12, 25 and 30 fps with sync markers; room destroyed while "
        "all publish",
        2006,
        (_person(X, 561, 0.0, fps=6), _person(Y, 562, 1.5, fps=12),
         _person(Z, 563, 3.0, fps=25), _person(W, 564, 4.5, fps=30)),
        21.0,
        "X (6 fps) from 0 s; Y (12 fps) joins ~1.5 s; Z (25 fps) ~3 s; W (30 fps) ~4.5 s; "
        "the admin destroys the room at ~21 s while all four publish. All 320x240.",
    ),
}

COLOUR_NAMES = {X.rgb: "teal", Y.rgb: "magenta", Z.rgb: "yellow", W.rgb: "green"}


# --- reading MJR files (independently of melter) ------------------------------------------


def read_mjr(path: Path) -> tuple[dict[str, Any], list[tuple[int, bytes]]]:
    """An ``MJR00002`` file's JSON header and its frames as ``(arrival ms, RTP bytes)``."""
    data = path.read_bytes()
    if data[:8] != b"MJR00002":
        raise ValueError(f"{path.name}: not an MJR00002 recording ({data[:8]!r})")
    size = struct.unpack_from("!H", data, 8)[0]
    header = json.loads(data[10:10 + size])
    frames = []
    pos = 10 + size
    while pos + 10 <= len(data):
        if data[pos:pos + 4] != b"MEET":
            raise ValueError(f"{path.name}: no frame prefix at byte {pos}")
        offset, length = struct.unpack_from("!IH", data, pos + 4)
        frames.append((offset, data[pos + 10:pos + 10 + length]))
        pos += 10 + length
    return header, frames


def _unwrap(values: list[int], bits: int) -> list[int]:
    out: list[int] = []
    span = 1 << bits
    for value in values:
        if out:
            previous = out[-1]
            value += (previous - previous % span)
            if value - previous > span // 2:
                value -= span
            elif previous - value > span // 2:
                value += span
        out.append(value)
    return out


def rtp_facts(header: dict[str, Any], frames: list[tuple[int, bytes]]) -> dict[str, Any]:
    """Sequence numbers, timestamps and arrival offsets of a recording's RTP packets."""
    clock = 48000 if header.get("t") == "a" else 90000
    seqs: list[int] = []
    stamps: list[int] = []
    pts: dict[str, int] = {}
    ssrcs: list[int] = []
    markers = 0
    for _, rtp in frames:
        _, second, seq, ts, ssrc = struct.unpack_from("!BBHII", rtp)
        seqs.append(seq)
        stamps.append(ts)
        pt = second & 0x7F
        pts[str(pt)] = pts.get(str(pt), 0) + 1
        markers += second >> 7
        if ssrc not in ssrcs:
            ssrcs.append(ssrc)
    useq, uts = _unwrap(seqs, 16), _unwrap(stamps, 32)
    offsets = [offset for offset, _ in frames]
    expected = max(useq) - min(useq) + 1
    return {
        "packets": len(frames),
        "payload_types": pts,
        "ssrcs": ssrcs,
        "seq_first": seqs[0],
        "seq_last": seqs[-1],
        "seq_expected": expected,
        "seq_missing": expected - len(set(useq)),
        "rtp_ts_first": stamps[0],
        "rtp_ts_last": stamps[-1],
        "rtp_clock_hz": clock,
        "rtp_span_s": round((max(uts) - min(uts)) / clock, 4),
        "distinct_timestamps": len(set(uts)),
        "marker_packets": markers,
        "file_offset_ms_first": offsets[0],
        "file_offset_ms_last": offsets[-1],
    }


# --- the manifest ---------------------------------------------------------------------------


def _rel(t: float | None, zero: float) -> float | None:
    return None if t is None else round(t - zero, 4)


def _iso_us(us: int) -> str:
    return datetime.datetime.fromtimestamp(us / 1e6, datetime.UTC).isoformat(
        timespec="microseconds")


def manifest(name: str, scenario: Scenario, log: MeetingLog, info: dict[str, Any],
             files: list[Path], events: list[dict]) -> dict[str, Any]:
    zero = log.created
    people = []
    by_pid = {s.person.pid: s for s in log.sent}
    for sent in log.sent:
        p = sent.person
        if sent.unpublished is not None:
            mode = "unpublish+leave" if sent.left is not None else "unpublish"
        elif sent.left is not None:
            mode = "leave"
        else:
            mode = "room destroyed"
        markers = []
        k = 1
        while sent.clock_zero + k * MARKER_PERIOD_S < sent.stopped:
            markers.append(round(sent.clock_zero + k * MARKER_PERIOD_S, 6))
            k += 1
        people.append({
            "name": p.name,
            "id": p.pid,
            "display": p.name,
            "join_s": p.join_at,
            "unpublish_s": p.unpublish_at,
            "leave_s": p.leave_at if p.leave_at is not None else scenario.destroy_at,
            "leave_mode": mode,
            "color_rgb": list(p.rgb),
            "color_name": COLOUR_NAMES.get(p.rgb, ""),
            "tone_hz": p.tone,
            "amplitude": 0.3,
            "codec": p.codec,
            "audio_codec": "opus",
            "fps": p.fps,
            "size": list(p.size),
            "width": p.size[0],
            "height": p.size[1],
            "markers": p.markers,
            "marker_period_s": MARKER_PERIOD_S,
            "flash_s": float(FLASH_S),
            "audio_gaps_s": [],
            "actual": {
                "media_clock_t0_epoch": sent.clock_zero,
                "media_clock_t0_rel_s": _rel(sent.clock_zero, zero),
                "join_request_epoch": sent.joined,
                "publish_request_epoch": sent.published,
                "connected_epoch": sent.connected,
                "unpublish_request_epoch": sent.unpublished,
                "leave_request_epoch": sent.left,
                "stopped_epoch": sent.stopped,
                "join_request_rel_s": _rel(sent.joined, zero),
                "publish_request_rel_s": _rel(sent.published, zero),
                "connected_rel_s": _rel(sent.connected, zero),
                "unpublish_request_rel_s": _rel(sent.unpublished, zero),
                "leave_request_rel_s": _rel(sent.left, zero),
                "stopped_rel_s": _rel(sent.stopped, zero),
                "video_frames_sent": sent.video_frames,
                "audio_frames_sent": sent.audio_frames,
                "video_first_frame": sent.video_first,
                "audio_first_frame": sent.audio_first,
                "white_frames_sent": sent.flash_frames,
                "marker_epochs": markers,
                "video_fmtp": sent.video_fmtp,
                "janus_session_id": sent.janus_session,
                "janus_handle_id": sent.janus_handle,
                "janus_candidates": sent.janus_candidates,
            },
        })
    entries = []
    for path in files:
        header, frames = read_mjr(path)
        words = path.stem.split("-")  # videoroom-<room>-user-<id>-<us>-<kind>-<mindex>
        pid = int(words[3])
        sent = by_pid[pid]
        kind = "audio" if header["t"] == "a" else "video"
        entries.append({
            "mjr": path.name,
            "bytes": path.stat().st_size,
            "room": int(words[1]),
            "publisher_id": pid,
            "kind": kind,
            "mindex": int(words[6]),
            "filename_timestamp_us": int(words[4]),
            "participant": sent.person.name,
            "display": sent.person.name,
            "mjr_header": header,
            "codec": header["c"],
            "mjr_created_us": header["s"],
            "mjr_first_packet_us": header["u"],
            "mjr_created_iso": _iso_us(header["s"]),
            "mjr_first_packet_iso": _iso_us(header["u"]),
            "mjr_created_rel_s": round(header["s"] / 1e6 - zero, 4),
            "mjr_first_packet_rel_s": round(header["u"] / 1e6 - zero, 4),
            "packets": len(frames),
            "rtp": rtp_facts(header, frames),
            "content": ({"tone_hz": sent.person.tone, "amplitude": 0.3,
                         "sync_marker": "tone at 2x frequency (phase-continuous) for 100 ms "
                                        "every 5 s of the media clock"}
                        if kind == "audio" else
                        {"color_rgb": list(sent.person.rgb), "fps": sent.person.fps,
                         "size": list(sent.person.size),
                         "sync_marker": "whole picture white (255,255,255) for the frames due "
                                        "in the first 100 ms of every 5 s of the media clock"}),
            "media_clock_t0_epoch": sent.clock_zero,
            "media_clock_t0_rel_s": _rel(sent.clock_zero, zero),
        })
    return {
        "scenario": name,
        "description": scenario.description,
        "generated_utc": datetime.datetime.now(datetime.UTC).isoformat(),
        "scenario_t0_epoch": log.created,
        "recorder": "tests/helpers/record_janus_fixture.py (harness tests/helpers/janus_e2e.py)",
        "janus": {"info": info},
        "room": {"room": log.room, "audiocodec": "opus",
                 "videocodec": ",".join(dict.fromkeys(p.codec for p in scenario.people)),
                 "record": True},
        "media_clock": (
            "per publisher: Z = the first recv of either track (media_clock_t0_epoch); video "
            "frame n is due at Z + n/fps with RTP-ts offset n*90000/fps, audio sample s at "
            "Z + s/48000 (20 ms Opus frames). Markers: frames/samples due in [5k, 5k+0.1) s "
            "after Z, k >= 1."),
        "participants": people,
        "admin_actions": [[round(log.destroyed - zero, 4), "destroy"]],
        "destroyed_epoch": log.destroyed,
        "files": entries,
        "totals": {"mjr_files": len(files), "mjr_bytes": sum(p.stat().st_size for p in files)},
        "events": {"count": len(events), "counts": event_counts(events)},
        "errors": [],
    }


# --- recording -------------------------------------------------------------------------------


def record(name: str) -> Path:
    reason = skip_reason()
    if reason is not None:
        raise SystemExit(f"cannot record: {reason}")
    scenario = SCENARIOS[name]
    out = FIXTURES / name
    with tempfile.TemporaryDirectory(prefix="melter-fixture-") as tmp, \
            network_namespace() as link:
        work = Path(tmp)
        rec_dir = work / "recordings"
        rec_dir.mkdir()
        (work / "janus").mkdir()
        with EventReceiver(link.host_ip) as receiver:
            janus = Janus(link, work / "janus", receiver.url)
            try:
                janus.start()
                info = http_json("GET", janus.url + "/info")
                log = asyncio.run(run_meeting(janus.url, rec_dir, scenario.people,
                                              scenario.destroy_at, scenario.room,
                                              scenario.description[:60]))
                deadline = time.monotonic() + 10
                while ("destroyed" not in receiver.videoroom(log.room)
                       and time.monotonic() < deadline):
                    time.sleep(0.1)
            except Exception:
                print(janus.log_tail(), file=sys.stderr)
                raise
            finally:
                janus.stop()
            time.sleep(1.0)  # the shutdown's events
            events = list(receiver.events)
        files = sorted(rec_dir.glob(f"videoroom-{log.room}-user-*.mjr"))
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        for path in files:
            shutil.copy2(path, out / path.name)
    copied = sorted(out.glob("*.mjr"))
    with (out / "events.jsonl").open("w") as f:
        for event in events:
            f.write(json.dumps(event, separators=(",", ":")) + "\n")
    data = manifest(name, scenario, log, info, copied, events)
    (out / "manifest.json").write_text(json.dumps(data, indent=1) + "\n")
    print(f"recorded {name}: room {log.room}, {len(copied)} files, {len(events)} events")
    return out


# --- checking ---------------------------------------------------------------------------------


def _melter(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "melter.cli", *args], capture_output=True,
                          text=True, env=melter_env({}), timeout=300, check=True)


def check(name: str) -> bool:
    """Inspect every file, convert and measure every participant; print the numbers."""
    from tests.helpers.mediacheck import (
        decode_audio,
        flash_onsets,
        pair_offsets,
        tone_doubling_onsets,
        video_frames_mean,
    )

    folder = FIXTURES / name
    data = json.loads((folder / "manifest.json").read_text())
    ok = True
    size = sum(p.stat().st_size for p in folder.iterdir())
    print(f"== {name}: {size / 1e6:.2f} MB")
    if size > MAX_FOLDER_BYTES:
        ok = False
        print(f"   FOLDER TOO LARGE (> {MAX_FOLDER_BYTES} B)")
    inspected: dict[str, dict[str, Any]] = {}
    for entry in data["files"]:
        got = json.loads(_melter("inspect", "--json", str(folder / entry["mjr"])).stdout)
        inspected[entry["mjr"]] = got
        line = (f"   {entry['participant']} {entry['kind']:5} {got['codec']:5} "
                f"{got['packets']:5} packets {got['frames']:5} frames, lost {got['lost']} "
                f"({got['loss_percent']}%), dup {got['duplicates']}, reordered "
                f"{got['reordered']}, {got['duration_s']:.3f} s")
        if entry["kind"] == "video":
            fps = (got["frames"] - 1) / got["duration_s"] if got["duration_s"] else 0.0
            sizes = ",".join(f"{r['width']}x{r['height']}" for r in got["resolutions"])
            line += (f", {fps:.2f} fps, {got['keyframes']} keyframes "
                     f"{got['keyframes_s'][:6]}, {sizes}")
        if got["warnings"]:
            line += f", warnings {got['warnings']}"
        print(line)
        if got["lost"] or got["gap_count"]:
            print(f"     gaps: {got['gaps']}")
    checks: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="melter-check-") as tmp:
        for person in data["participants"]:
            mine = {f["kind"]: folder / f["mjr"] for f in data["files"]
                    if f["participant"] == person["name"]}
            mkv = Path(tmp) / f"{person['name']}.mkv"
            _melter("convert", str(mine["audio"]), str(mine["video"]), "-o", str(mkv))
            frames = video_frames_mean(mkv)
            flashes = flash_onsets(frames)
            audio = decode_audio(mkv)
            tones = tone_doubling_onsets(audio, person["tone_hz"])
            offsets = pair_offsets(flashes, tones)
            expected = len(person["actual"]["marker_epochs"])
            spacing = [b - a for a, b in itertools.pairwise(flashes)]
            tone_spacing = [b - a for a, b in itertools.pairwise(tones)]
            worst = max((abs(o) for o in offsets), default=float("nan"))
            median = statistics.median(offsets) if offsets else float("nan")
            good = (len(flashes) == len(tones) == len(offsets) == expected
                    and worst <= SYNC_TOLERANCE_S
                    and all(abs(s - MARKER_PERIOD_S) < 0.02 for s in spacing + tone_spacing))
            ok &= good
            print(f"   {person['name']} ({person['fps']} fps {person['codec']} "
                  f"{person['size'][0]}x{person['size'][1]}, {person['tone_hz']:g} Hz): "
                  f"{len(flashes)} flashes, {len(tones)} tone doublings, {expected} expected; "
                  f"offsets tone-flash ms {[round(o * 1000, 1) for o in offsets]} "
                  f"(median {median * 1000:.1f}, worst {worst * 1000:.1f}); "
                  f"flash spacing {[round(s, 3) for s in spacing]}, "
                  f"tone spacing {[round(s, 3) for s in tone_spacing]}"
                  f"{'' if good else '  <-- BAD'}")
            checks[person["name"]] = {
                "flash_onsets_s": [round(t, 4) for t in flashes],
                "tone_doubling_onsets_s": [round(t, 4) for t in tones],
                "offsets_ms": [round(o * 1000, 2) for o in offsets],
                "median_ms": round(median * 1000, 2),
                "worst_ms": round(worst * 1000, 2),
            }
    data["checks"] = {
        "note": "measured on `melter convert AUDIO VIDEO -o P.mkv` of this tree's melter when "
                "recorded (seconds of that file); tone doubling minus white flash",
        "participants": checks,
        "ok": ok,
    }
    (folder / "manifest.json").write_text(json.dumps(data, indent=1) + "\n")
    print(f"   {'OK' if ok else 'FAILED'}")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=sorted(SCENARIOS))
    parser.add_argument("--check", action="store_true",
                        help="only check the recorded fixture again")
    args = parser.parse_args()
    if not args.check:
        record(args.name)
    sys.exit(0 if check(args.name) else 1)


if __name__ == "__main__":
    main()
