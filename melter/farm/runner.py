"""What a unit does: plan (and maybe split) a job, render, render a chunk, join, commit.

Long meetings are split into chunks at scene boundaries. Each chunk's video is rendered by melt
with an ``in``/``out`` frame range and no audio (``an=1``) as a fresh encode (so each starts on
a key frame), and its audio as AAC packets on the meeting's packet grid (or PCM for other
codecs: :func:`melter.render.audio_piece`); the join concatenates the video chunks without
re-encoding (FFmpeg's concat demuxer, ``-c copy``) and copies the audio packets beside them
(:mod:`melter.splice`). Frames, samples and packets are counted at every step, so the joined
file has exactly the frames of a single-pass render, and its sound at the same samples.

Chunks are kept under a key (:func:`melter.render.chunk_key`) beside the output, so a chunk
rendered while the meeting went on (a *prerender* job) stands for the same chunk of the
finished meeting.

Outputs are rendered under a temporary name in ``.melter-tmp/<job>/`` beside the output, then
committed only while the attempt holds its lease: the manifest is written, and the media file
hard-linked onto its name, which fails rather than overwrite anything.

Nothing submitted is trusted to be where it was (see :mod:`melter.farm.paths`): the inputs are
checked under the storage root again, recordings that have become links out of it are skipped,
layouts come from the documents resolved at submit, and output folders are reached and written
through descriptors opened without following links, so a folder swapped for a link fails the
job instead of receiving its files.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import math
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import redis

from melter.compose import PLAN_HORIZON_S
from melter.engine.mlt import RenderError
from melter.errors import MelterError
from melter.farm.attempt import Attempt
from melter.farm.job import UnitKind, chunk_place, iso, under_root, unit_output
from melter.farm.jobs import JobRecord, OutputTarget, manifest_path, remove_tmp
from melter.farm.manifest import (
    LIVE,
    MANIFEST_LIMIT,
    describe_inputs,
    file_mode,
    is_live,
    measure,
    tool_versions,
)
from melter.farm.paths import (
    folder_fd,
    layouts_for,
    open_folder,
    read_at,
    same_place,
    write_at,
)
from melter.farm.procs import REGISTRY
from melter.hls import atomic_playlist, free_stem, named_after, place, read_playlist, segment_name
from melter.livehls import (
    LiveChunk,
    closed_segments,
    event_playlist,
    segment_frames,
    write_segments,
)
from melter.render import (
    PRESETS,
    Preset,
    RenderOptions,
    RenderPlan,
    StalePlan,
    audio_piece,
    audio_piece_key,
    chunk_key,
    plan_render,
    render,
    render_audio_piece,
)
from melter.rooted import exists_at, link_new
from melter.splice import first_packet
from melter.windows import AUDIO_WEIGHT, count_video_frames, join_parts, window_ranges

#: How far behind the clock recordings on shared storage may be (buffered writes, NFS
#: attribute caching): a prerender leaves that much more of a meeting still going on for later.
PROGRESSIVE_MARGIN_S = 3.0
#: Relative cost of a unit, per output frame (a video frame = 1): for the progress estimate.
JOIN_WEIGHT = 0.05


#: The job's render plan, stored beside its first output's scratch files (see :func:`_planned`).
PLAN_FILE = "render-plan.json"
#: The job's field holding the stored plan's SHA-256: a unit uses only the file its job wrote.
PLAN_DIGEST = "plan_sha256"
PLAN_LIMIT = 256 << 20
#: Benchmarks and tests only: ``module:function``, called with each unit's attempt and job
#: record before anything else; when it returns True it has run the unit (a fixed-cost stand-in
#: for melt, to measure the farm itself: ``bench/stand_in.py``). Unset on a real farm.
UNIT_HOOK = "MELTER_UNIT_HOOK"
_HOOKS: dict[str, Callable[[Attempt, JobRecord], bool]] = {}


def unit_hook() -> Callable[[Attempt, JobRecord], bool] | None:
    spec = os.environ.get(UNIT_HOOK)
    if not spec:
        return None
    if spec not in _HOOKS:
        module, _, name = spec.partition(":")
        _HOOKS[spec] = getattr(importlib.import_module(module), name)
    return _HOOKS[spec]


def run(attempt: Attempt) -> None:
    record = attempt.farm.record(attempt.job)
    unit = attempt.unit
    hook = unit_hook()
    if hook is not None and hook(attempt, record):
        return
    try:
        kind = UnitKind.of(unit)
    except ValueError:
        raise MelterError(f"unknown unit {unit!r}") from None
    if kind is UnitKind.MAIN:
        _main(attempt, record)
    elif kind is UnitKind.RENDER:
        _render_outputs(attempt, record, [unit_output(unit)], _planned(attempt, record))
    elif kind in (UnitKind.VIDEO, UnitKind.AUDIO) and _superseded(attempt, record):
        attempt.stage("superseded by the meeting's render")
        _skip(attempt, record)
    elif kind is UnitKind.VIDEO:
        _video_chunk(attempt, record)
    elif kind is UnitKind.AUDIO:
        _audio(attempt, record, unit_output(unit))
    else:
        _join(attempt, record, unit_output(unit))


# -- planning ----------------------------------------------------------------------------------
def resolve_layout(record: JobRecord, root: Path) -> tuple[Any, Any]:
    """The job's layout and rule layouts, from what was resolved at submit."""
    return layouts_for(record.spec.layout, record.fields.get("rule_layouts"), root)


def checked_inputs(record: JobRecord, root: Path) -> list[Path]:
    """The job's inputs, checked under the storage root again (a folder may have been swapped
    for a link since the job was submitted)."""
    return [under_root(p, root, "input", "MELTER_STORAGE_ROOT") for p in record.inputs]


def _planned(attempt: Attempt, record: JobRecord) -> RenderPlan:
    """The job's render plan: the one stored with the job while it still holds, else planned
    here (discovery, analysis, the layout) and stored for the job's other units.

    The file lies beside the job's scratch files and the job's state keeps its digest, so a
    unit only reads the file a unit of its job wrote. Units that race write the same plan,
    each file whole (a private temporary renamed into place).
    """
    stored = _stored_plan(attempt, record)
    if stored is not None:
        return stored
    attempt.stage("planning")
    root = attempt.config.storage_root
    inputs = checked_inputs(record, root)
    layout, layouts = resolve_layout(record, root)
    options = RenderOptions(trim=record.spec.trim, room=record.spec.room, root=root)
    planned = plan_render(inputs, layout, options, layouts=layouts)
    attempt.check()
    data = planned.to_json()
    with folder_fd(attempt.config.outputs_root, record.tmp_dir(0), create=True) as folder:
        write_at(folder, PLAN_FILE, data, file_mode())
    digest = hashlib.sha256(data).hexdigest()
    attempt.store.set_fields(record.id, {PLAN_DIGEST: digest})
    record.fields[PLAN_DIGEST] = digest
    return planned


def _stored_plan(attempt: Attempt, record: JobRecord) -> RenderPlan | None:
    """The job's stored render plan, unless it is missing, not the one the job's state names,
    from another version of melter, or about recordings that have changed since (or have
    become links)."""
    digest = record.fields.get(PLAN_DIGEST)
    if not digest:
        return None
    try:
        with folder_fd(attempt.config.outputs_root, record.tmp_dir(0)) as folder:
            data = read_at(folder, PLAN_FILE, PLAN_LIMIT)
    except (OSError, MelterError):
        return None
    if hashlib.sha256(data).hexdigest() != digest:
        return None
    try:
        planned = RenderPlan.from_json(data)
    except StalePlan:
        return None
    root = attempt.config.storage_root
    try:
        if any(under_root(path, root, "input", "MELTER_STORAGE_ROOT") != path
               for path in planned.recording_paths):
            return None
    except MelterError:
        return None
    if planned.trim != record.spec.trim:
        return None
    # A prerender's recordings grow while its units run: its plan holds for the frames it
    # gave them, which lie where later writing changes nothing (see settled_frames).
    if not (planned.unchanged() or (record.spec.prerender and planned.only_grown())):
        return None
    return planned


def _main(attempt: Attempt, record: JobRecord) -> None:
    planned = _planned(attempt, record)
    config = attempt.config
    seconds = record.spec.chunk_seconds
    if seconds is None:
        seconds = config.chunk_seconds
    duration = planned.frames / planned.fps
    video = [k for k, o in enumerate(record.outputs) if not PRESETS[o.preset].audio_only]
    attempt.stage("hashing inputs")
    inputs = describe_inputs(checked_inputs(record, config.storage_root), config.storage_root)
    meeting = {"room": planned.meeting.room, "duration_s": round(duration, 3),
               "participants": [p.display for p in planned.meeting.participants],
               "frames": planned.frames, "fps": planned.fps}
    shared = {"inputs_info": json.dumps(inputs), "meeting": json.dumps(meeting),
              "frames": str(planned.frames), "fps": str(planned.fps)}
    attempt.store.set_fields(record.id, shared)
    if record.spec.prerender:
        _prerender(attempt, record, planned, seconds)
        return
    if not (seconds > 0 and duration >= 2 * seconds and video):
        _render_outputs(attempt, record, list(range(len(record.outputs))), planned)
        return
    units: list[dict[str, Any]] = []
    fields: dict[str, str] = {}
    chunks = 0
    keys = _PartKeys(planned, cache_dir(attempt))
    for k, output in enumerate(record.outputs):
        preset = PRESETS[output.preset]
        if preset.audio_only:
            units.append({"name": UnitKind.RENDER.unit(k), "weight": planned.frames * AUDIO_WEIGHT,
                          "output": k})
            continue
        ranges = window_ranges(planned, preset, seconds)
        chunks = max(chunks, len(ranges))
        # Each chunk's video and audio are units of their own, but for the chunks kept
        # already (rendered while the meeting went on): the join takes those as they are, and
        # the units left are what remains to render, however long the meeting.
        attempt.stage("finding kept chunks")
        names: list[str] = []
        kept: list[dict[str, Any]] = []
        # Chunks another job's unit is rendering now go last: their units wait for those
        # (see part_ready), and by then the others are done.
        free: list[dict[str, Any]] = []
        busy: list[dict[str, Any]] = []
        look = not planned.trim and _has_parts(attempt, record, k)
        for i, (first, last) in enumerate(ranges):
            taken = _take_kept(attempt, record, k, i, (first, last), keys) if look else None
            if taken is not None:
                kept.append(taken)
                continue
            claimed = look and attempt.store.r.exists(
                _claim_key(attempt, keys.video(k, _part(output)[0], (first, last))))
            for kind, weight in ((UnitKind.VIDEO, 1.0), (UnitKind.AUDIO, AUDIO_WEIGHT)):
                names.append(kind.unit(k, i))
                (busy if claimed else free).append(
                    {"name": names[-1], "weight": (last - first + 1) * weight,
                     "first": first, "last": last, "output": k})
        units += free + busy
        units.append({"name": UnitKind.JOIN.unit(k), "weight": planned.frames * JOIN_WEIGHT,
                      "deps": ",".join(names), "output": k})
        fields[KEPT_FIELD + str(k)] = json.dumps(kept)
        for taken in kept:
            fields[PART_FIELD + UnitKind.VIDEO.unit(k, taken["i"])] = "reused:" + taken["vkey"]
            fields[PART_FIELD + UnitKind.AUDIO.unit(k, taken["i"])] = "reused:" + taken["akey"]
    attempt.begin_commit()
    attempt.finishing()
    dispatches = attempt.store.expand(record.id, attempt.token, units,
                                      config.dispatch_grace_seconds,
                                      {"chunks": str(chunks), **fields})
    attempt.farm.send(dispatches)


#: The job's field listing output ``k``'s chunks kept from earlier that no unit renders
#: (``kept:<k>``: their frames and files, for the join).
KEPT_FIELD = "kept:"


def _take_kept(attempt: Attempt, record: JobRecord, k: int, i: int, chunk: tuple[int, int],
               keys: _PartKeys) -> dict[str, Any] | None:
    """Chunk ``i`` of output ``k`` as kept earlier (its video and its audio piece), linked
    into the job's folder where the join will find them: no unit need render or fetch it.
    None unless both parts are kept."""
    output = record.outputs[k]
    preset, suffix = _part(output)
    planned = keys.planned
    piece = audio_piece(planned, preset, chunk)
    vkey, akey = keys.video(k, preset, chunk), keys.audio(k, preset, chunk)
    root = attempt.config.outputs_root
    names = (f"v{i}.{attempt.token}{suffix}", f"a{i}.{attempt.token}{piece.suffix}")
    try:
        with folder_fd(root, _parts_folder(record, k)) as parts, \
                folder_fd(root, record.tmp_dir(k), create=True) as folder:
            if not (exists_at(parts, vkey + suffix) and exists_at(parts, akey + piece.suffix)):
                return None
            for key, part_suffix, name in ((vkey, suffix, names[0]),
                                           (akey, piece.suffix, names[1])):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=folder)  # left by an attempt that died
                link_new(parts, key + part_suffix, folder, name)
    except (OSError, MelterError):
        return None
    tmp = record.tmp_dir(k)
    return {"i": i, "first": chunk[0], "last": chunk[1], "vkey": vkey, "akey": akey,
            "video": str(tmp / names[0]), "audio": str(tmp / names[1])}


def settled_frames(planned: RenderPlan, seconds: float, now: float | None = None, *,
                   cuts_move: bool = True) -> int:
    """How many of a meeting's first frames no later writing can change: up to the latest
    packet on disk (and not past the clock, less the farm's margin for buffered writes and
    shared storage), less the horizon of a plan made from recordings still growing, less a
    quarter chunk and a second where chunks are cut at scene changes (where the next
    chunk's cut may still move to; ``cuts_move`` False: chunks on a fixed grid)."""
    tracks = [t for p in planned.meeting.participants for s in p.segments for t in s.tracks]
    latest = max((t.end_us for t in tracks), default=planned.meeting.start_us)
    now_us = round((time.time() if now is None else now) * 1e6)
    written_us = min(latest, now_us - round(PROGRESSIVE_MARGIN_S * 1e6))
    settled_s = ((written_us - planned.meeting.start_us) / 1e6 - PLAN_HORIZON_S
                 - (seconds / 4 + 1.0 if cuts_move else 0.0))
    return max(0, math.floor(settled_s * planned.fps))


class _PartKeys:
    """The keys of a planned meeting's chunks (:func:`chunk_key`, :func:`audio_piece_key`),
    each computed once: a prerender names each chunk's parts when it publishes the live
    playlist and again when it picks the chunks left to render."""

    def __init__(self, planned: RenderPlan, workdir: Path) -> None:
        self.planned = planned
        self.workdir = workdir
        self._known: dict[tuple[int, tuple[int, int], bool], str] = {}

    def video(self, k: int, preset: Preset, chunk: tuple[int, int]) -> str:
        """Output ``k``'s chunk (its parts' preset ``preset``)."""
        return self._key(k, preset, chunk, True)

    def audio(self, k: int, preset: Preset, chunk: tuple[int, int]) -> str:
        return self._key(k, preset, chunk, False)

    def _key(self, k: int, preset: Preset, chunk: tuple[int, int], video: bool) -> str:
        known = (k, chunk, video)
        if known not in self._known:
            self._known[known] = (
                chunk_key(self.planned, preset, chunk, video=True, workdir=self.workdir)
                if video else audio_piece_key(self.planned, preset, chunk, workdir=self.workdir))
        return self._known[known]


def _prerender(attempt: Attempt, record: JobRecord, planned: RenderPlan,
               seconds: float) -> None:
    """A meeting still going on: render the chunks its recordings already hold for good, and
    only those not kept already (see :func:`keep_part`); no join, no output."""
    if planned.trim or not seconds > 0:
        raise MelterError("a prerender needs chunks (chunk_seconds > 0) and no trim")
    now = time.time()
    keys = _PartKeys(planned, cache_dir(attempt))
    units: list[dict[str, Any]] = []
    for k, output in enumerate(record.outputs):
        preset, suffix = _part(output)
        if preset.audio_only:
            continue
        settled = settled_frames(planned, seconds, now,
                                 cuts_move=not preset.keyframe_seconds)
        if PRESETS[output.preset].hls:
            attempt.stage("publishing the live playlist")
            _publish_live(attempt, record, k, planned, seconds, keys)
        chunk_units: list[str] = []
        for i, (first, last) in enumerate(window_ranges(planned, preset, seconds)):
            if last >= settled:
                break
            piece = audio_piece(planned, preset, (first, last))
            if piece.frames[1] >= settled:  # the audio's context after the chunk, too
                break
            for kind, weight in ((UnitKind.VIDEO, 1.0), (UnitKind.AUDIO, AUDIO_WEIGHT)):
                if kind is UnitKind.VIDEO:
                    key, part_suffix = keys.video(k, preset, (first, last)), suffix
                else:
                    key, part_suffix = keys.audio(k, preset, (first, last)), piece.suffix
                if _kept(attempt, record, k, key, part_suffix):
                    continue
                chunk_units.append(kind.unit(k, i))
                units.append({"name": kind.unit(k, i), "weight": (last - first + 1) * weight,
                              "first": first, "last": last, "output": k})
        if chunk_units and PRESETS[output.preset].hls:
            # The live playlist gains the new chunks' segments once they are all rendered.
            units.append({"name": UnitKind.JOIN.unit(k), "weight": planned.frames * JOIN_WEIGHT,
                          "deps": ",".join(chunk_units), "output": k})
    attempt.begin_commit()
    attempt.finishing()
    if not units:
        _, ready = attempt.store.complete(record.id, attempt.unit, attempt.token, "",
                                          attempt.config.dispatch_grace_seconds,
                                          attempt.farm.ttl)
        attempt.farm.send(ready)
        return
    dispatches = attempt.store.expand(record.id, attempt.token, units,
                                      attempt.config.dispatch_grace_seconds,
                                      {"chunks": str(len(units))})
    attempt.farm.send(dispatches)


def _superseded(attempt: Attempt, record: JobRecord) -> bool:
    """Whether this is a prerender's chunk of a meeting whose render has already put its
    output in place (the render took the chunk over: its part would never be used)."""
    if not record.spec.prerender:
        return False
    output = record.outputs[unit_output(attempt.unit)].path
    try:
        with folder_fd(attempt.config.outputs_root, output.parent) as folder:
            return exists_at(folder, output.name) and not _live_output(folder, output.name)
    except (OSError, MelterError):
        return False


def _skip(attempt: Attempt, record: JobRecord) -> None:
    """End the unit with nothing to hand on."""
    attempt.begin_commit()
    attempt.finishing()
    _, ready = attempt.store.complete(record.id, attempt.unit, attempt.token, "",
                                      attempt.config.dispatch_grace_seconds, attempt.farm.ttl)
    attempt.farm.send(ready)


# -- the live playlist -------------------------------------------------------------------------
def _live_output(folder: int, name: str) -> bool:
    """Whether ``name`` in ``folder`` is a live playlist (by its manifest)."""
    try:
        return is_live(read_at(folder, name + ".manifest.json", MANIFEST_LIMIT))
    except (OSError, MelterError):
        return False


def _finished_chunks(record: JobRecord, k: int, planned: RenderPlan, seconds: float,
                     parts: int, keys: _PartKeys, from_frame: int) -> list[LiveChunk]:
    """The run of chunks kept in the parts folder ``parts`` from the one that holds frame
    ``from_frame`` on (the live playlist's first segment not yet written): each prerender
    names and reads only the chunks it may add, whatever came before them."""
    output = record.outputs[k]
    preset, suffix = _part(output)
    found: list[LiveChunk] = []
    for first, last in window_ranges(planned, preset, seconds):
        if last < from_frame:
            continue
        piece = audio_piece(planned, preset, (first, last))
        if piece.stretch is None:
            return []  # not AAC: nothing to copy into segments
        video = keys.video(k, preset, (first, last)) + suffix
        audio = keys.audio(k, preset, (first, last)) + piece.suffix
        if not (exists_at(parts, video) and exists_at(parts, audio)):
            break
        folder = Path(f"/proc/{os.getpid()}/fd/{parts}")
        found.append(LiveChunk(folder / video, folder / audio, first, last,
                               first_packet(piece.stretch)))
    return found


def _publish_live(attempt: Attempt, record: JobRecord, k: int, planned: RenderPlan,
                  seconds: float, keys: _PartKeys | None = None) -> None:
    """Add the segments of the chunks finished since to output ``k``'s live playlist (an HLS
    EVENT playlist under the output's name, its manifest marked ``live``): segments are
    linked first, then the manifest, then the playlist that names them, which only ever
    grows. An output already in place that is not a live playlist is the meeting's render,
    and a name reserved by a job is its render's to come: nothing is touched."""
    output = record.outputs[k]
    root = attempt.config.outputs_root
    segment_s = PRESETS[output.preset].keyframe_seconds or 6
    name, side = output.path.name, manifest_path(output.path).name
    try:
        parts = open_folder(root, _parts_folder(record, k))
    except (OSError, MelterError):
        return
    try:
        with folder_fd(root, output.path.parent) as target:
            if exists_at(target, name) and not _live_output(target, name):
                return
            try:
                earlier = json.loads(read_at(target, side, MANIFEST_LIMIT))
            except (OSError, MelterError, ValueError):
                earlier = {}
            live = earlier.get(LIVE) is True
            stem = earlier.get("stem") if live else None
            published: list[tuple[str, float]] = []
            if live and exists_at(target, name):
                published = read_playlist(target, name, live=True).segments
            if not isinstance(stem, str) or not named_after(name, segment_name(stem, 0)) \
                    or not all(named_after(name, s) for s, _ in published):
                stem, published = free_stem(target, output.path.stem), []
            chunks = _finished_chunks(record, k, planned, seconds, parts,
                                      keys or _PartKeys(planned, cache_dir(attempt)),
                                      len(published) * segment_frames(planned.fps, segment_s))
            closed = closed_segments(chunks, planned.fps, segment_s)
            if closed <= len(published):
                return
            staging = attempt_dir(attempt, record, k)
            added = write_segments(chunks, planned.fps, segment_s, len(published), closed,
                                   staging, stem)
            if attempt.store.output_owner(str(output.path)) is not None:
                # The meeting's render has reserved the name (at its submit, long before it
                # commits): the playlist is its to replace, not to grow any more.
                return
            with _source(root, staging) as source:
                for segment, _ in added:
                    os.chmod(segment, file_mode(), dir_fd=source)
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(segment, dir_fd=target)  # left by an attempt that died
                    link_new(source, segment, target, segment)
            os.fsync(target)
            segments = published + added
            manifest = {"manifest": 1, LIVE: True, "job": record.id, "stem": stem,
                        "segments": len(segments),
                        "duration_s": round(sum(s for _, s in segments), 6),
                        "updated": iso(time.time())}
            write_at(target, side, (json.dumps(manifest, indent=2) + "\n").encode(),
                     file_mode())
            write_at(target, name, event_playlist(segments, segment_s).encode(), file_mode())
    finally:
        os.close(parts)


# -- kept chunks -------------------------------------------------------------------------------
#: Chunks rendered while a meeting went on (or by an earlier render of it), named by their
#: key (:func:`melter.render.chunk_key`), beside each output.
PARTS_DIR = ".melter-parts"


def _parts_folder(record: JobRecord, k: int) -> Path:
    return record.outputs[k].path.parent / PARTS_DIR


def _has_parts(attempt: Attempt, record: JobRecord, k: int) -> bool:
    """Whether output ``k`` has a parts folder (chunks kept for it, or being kept)."""
    try:
        with folder_fd(attempt.config.outputs_root, record.outputs[k].path.parent) as folder:
            return exists_at(folder, PARTS_DIR)
    except (OSError, MelterError):
        return False


def _kept(attempt: Attempt, record: JobRecord, k: int, key: str, suffix: str) -> bool:
    try:
        with folder_fd(attempt.config.outputs_root, _parts_folder(record, k)) as folder:
            return exists_at(folder, key + suffix)
    except (OSError, MelterError):
        return False


def reuse_part(attempt: Attempt, record: JobRecord, k: int, key: str, temp: Path) -> bool:
    """Link the kept chunk of ``key`` onto ``temp`` (in this attempt's folder), if there is
    one."""
    root = attempt.config.outputs_root
    try:
        with folder_fd(root, _parts_folder(record, k)) as parts, \
                _source(root, temp.parent) as target:
            link_new(parts, key + temp.suffix, target, temp.name)
    except (OSError, MelterError):
        return False
    return True


#: How often a unit waiting for a chunk another unit renders looks again (seconds).
PART_POLL_S = 0.5


def _claim_key(attempt: Attempt, key: str) -> str:
    return f"{attempt.store.p}:part:{key}"


def part_ready(attempt: Attempt, record: JobRecord, k: int, key: str, temp: Path) -> bool:
    """Link the kept chunk of ``key`` onto ``temp``, waiting for it while another unit renders
    it (a prerender's unit when the meeting ended, or the meeting's render when a late
    prerender comes): the same chunk is never rendered twice at once. False when this unit is
    to render it; it then holds the chunk's claim, which lasts while its lease does."""
    claim = _claim_key(attempt, key)
    mine = f"{attempt.job}|{attempt.unit}|{attempt.token}"
    r = attempt.store.r
    waited = False
    while True:
        if reuse_part(attempt, record, k, key, temp):
            return True
        if r.set(claim, mine, nx=True, px=int(attempt.config.hard_time_limit * 1000)):
            return False
        holder = r.get(claim)
        job, _, rest = (holder or "").partition("|")
        unit, _, token = rest.partition("|")
        if holder is not None and (not job or r.get(
                f"{attempt.store.p}:lease:{job}|{unit}") != token):
            # The unit that claimed it has lost its lease (its worker died): the claim goes.
            with r.pipeline() as pipe:
                try:
                    pipe.watch(claim)
                    if pipe.get(claim) == holder:
                        pipe.multi()
                        pipe.delete(claim)
                        pipe.execute()
                except redis.WatchError:
                    pass
            continue
        if not waited:
            attempt.stage(f"waiting for {unit} of job {job}, which renders the same chunk")
            waited = True
        attempt.check()
        time.sleep(PART_POLL_S)


def release_part(attempt: Attempt, key: str) -> None:
    """Give up this unit's claim on a chunk it has kept (if it still holds it)."""
    claim = _claim_key(attempt, key)
    r = attempt.store.r
    with contextlib.suppress(redis.RedisError), r.pipeline() as pipe:
        try:
            pipe.watch(claim)
            if pipe.get(claim) == f"{attempt.job}|{attempt.unit}|{attempt.token}":
                pipe.multi()
                pipe.delete(claim)
                pipe.execute()
        except redis.WatchError:
            pass


def keep_part(attempt: Attempt, record: JobRecord, k: int, key: str, final: Path) -> None:
    """Keep a finished chunk under its key, for a later render of the same meeting (an
    existing one is the same chunk: it stays)."""
    root = attempt.config.outputs_root
    with contextlib.suppress(OSError, MelterError), \
            folder_fd(root, _parts_folder(record, k), create=True) as parts, \
            folder_fd(root, final.parent) as source:
        link_new(source, final.name, parts, key + final.suffix)
    with contextlib.suppress(redis.RedisError):
        attempt.store.note_parts(str(_parts_folder(record, k)), time.time())


# -- rendering ---------------------------------------------------------------------------------
#: Descriptors of this attempt's scratch folders (closed when the attempt ends).
_PINNED: list[int] = []


def attempt_dir(attempt: Attempt, record: JobRecord, k: int) -> Path:
    """This attempt's scratch folder beside output ``k``, made without following links from
    the output root down (a folder swapped for a link fails the attempt here), and returned
    as the path of its open descriptor (``/proc/<pid>/fd/<n>``): melt, FFmpeg and this
    process then write into the folder that was checked, even if a folder on the way is
    swapped for a link while they run."""
    folder = record.tmp_dir(k) / f"{attempt.unit}-{attempt.token}"
    fd = open_folder(attempt.config.outputs_root, folder, create=True)
    _PINNED.append(fd)
    return Path(f"/proc/{os.getpid()}/fd/{fd}")


def release_dirs() -> None:
    while _PINNED:
        with contextlib.suppress(OSError):
            os.close(_PINNED.pop())


@contextlib.contextmanager
def _source(root: Path, folder: Path) -> Iterator[int]:
    """A descriptor of a scratch folder: a pinned one reopened through its descriptor's
    path, any other reached from the root without following links."""
    if folder.is_relative_to(f"/proc/{os.getpid()}/fd"):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            yield fd
        finally:
            os.close(fd)
    else:
        with folder_fd(root, folder) as fd:
            yield fd


def cache_dir(attempt: Attempt) -> Path:
    root = attempt.config.cache_dir or Path(tempfile.gettempdir()) / "melter-farm-cache"
    folder = root / attempt.job / "media"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def drop_cache(attempt: Attempt) -> None:
    """This worker's prepared media of a job that has ended."""
    root = attempt.config.cache_dir or Path(tempfile.gettempdir()) / "melter-farm-cache"
    shutil.rmtree(root / attempt.job, ignore_errors=True)


def cleanup_attempt(attempt: Attempt) -> None:
    """Remove this attempt's scratch folder (its committed files were linked elsewhere)."""
    release_dirs()
    try:
        record = attempt.farm.record(attempt.job)
    except Exception:
        return
    for k in range(len(record.outputs)):
        folder = record.tmp_dir(k) / f"{attempt.unit}-{attempt.token}"
        if folder.exists() and same_place(folder):
            shutil.rmtree(folder, ignore_errors=True)


def _render_outputs(attempt: Attempt, record: JobRecord, indices: list[int],
                    planned: RenderPlan) -> None:
    rendered: list[tuple[int, Path]] = []
    started = time.time()
    for n, k in enumerate(indices):
        output = record.outputs[k]
        preset = PRESETS[output.preset]
        temp = attempt_dir(attempt, record, k) / f"render{output.path.suffix}"
        attempt.window(n / len(indices), 1 / len(indices))
        attempt.stage(f"rendering {output.path.name}" if len(indices) > 1 else "rendering")
        render(planned, [(temp, preset)], workdir=cache_dir(attempt), progress=attempt.progress)
        rendered.append((k, temp))
    commit_outputs(attempt, record, rendered, {"render_s": round(time.time() - started, 3)},
                   layout=planned.layout)


def _staged(attempt: Attempt, rendering: str) -> Callable[[str], None]:
    """``render``'s stages as this unit names them."""
    return lambda name: attempt.stage(rendering if name == "rendering" else name)


def _part(output: OutputTarget) -> tuple[Preset, str]:
    """The preset and file suffix of an output's chunks and join (an HLS
    playlist's are MP4: the playlist is cut from the joined file)."""
    preset = PRESETS[output.preset]
    return preset.parts, preset.parts.suffix if preset.hls else output.path.suffix


def _video_chunk(attempt: Attempt, record: JobRecord) -> None:
    k, i = chunk_place(attempt.unit)
    unit = attempt.store.unit(record.id, attempt.unit)
    first, last = int(unit["first"]), int(unit["last"])
    count = last - first + 1
    planned = _planned(attempt, record)
    output = record.outputs[k]
    preset, suffix = _part(output)
    folder = record.tmp_dir(k)
    temp = attempt_dir(attempt, record, k) / f"v{i}{suffix}"
    key = _part_key(attempt, planned, preset, (first, last), True)
    reused = bool(key and part_ready(attempt, record, k, key, temp))
    if not reused:
        # Video only, from the chunk's first frame: each video source starts reading there.
        render(planned, [(temp, preset)], frames=(first, last), audio=False,
               workdir=cache_dir(attempt), progress=attempt.progress,
               stage=_staged(attempt, f"rendering chunk {i + 1}"))
    attempt.check()
    frames = count_video_frames(temp)
    if frames != count:
        raise RenderError(f"chunk {i} (frames {first}-{last}) has {frames} frames, not {count}")
    final = folder / f"v{i}.{attempt.token}{suffix}"
    _note_part(attempt, record, key, reused)
    _commit_part(attempt, record, temp, final)
    if key:
        keep_part(attempt, record, k, key, final)
        release_part(attempt, key)


#: The job's field naming a chunk unit's key, and whether it was kept from earlier.
PART_FIELD = "part:"


def _note_part(attempt: Attempt, record: JobRecord, key: str | None, reused: bool) -> None:
    if key:
        attempt.store.set_fields(record.id, {
            PART_FIELD + attempt.unit: ("reused:" if reused else "rendered:") + key})


def _drop_parts(attempt: Attempt, record: JobRecord, k: int, units: Iterable[str],
                suffixes: dict[str, str]) -> None:
    """Once the joined file is committed, the kept chunks it was made of are of no more use
    (a render of the meeting by another layout has other keys)."""
    fields = attempt.store.job(record.id)
    root = attempt.config.outputs_root
    with contextlib.suppress(OSError, MelterError), \
            folder_fd(root, _parts_folder(record, k)) as parts:
        for unit in units:
            _, _, key = (fields.get(PART_FIELD + unit) or "").partition(":")
            if key:
                with contextlib.suppress(OSError):
                    os.unlink(key + suffixes[unit[:1]], dir_fd=parts)
    # The folder goes once it is empty (a meeting going on beside keeps it).
    with contextlib.suppress(OSError, MelterError), \
            folder_fd(root, record.outputs[k].path.parent) as folder:
        os.rmdir(PARTS_DIR, dir_fd=folder)


def _part_key(attempt: Attempt, planned: RenderPlan, preset: Preset, frames: tuple[int, int],
              video: bool) -> str | None:
    """The chunk's key (None for a trimmed render, whose chunks are not kept)."""
    if planned.trim:
        return None
    return chunk_key(planned, preset, frames, video=video, workdir=cache_dir(attempt))


def _commit_part(attempt: Attempt, record: JobRecord, temp: Path, final: Path) -> None:
    """Name a finished chunk's video or audio by its attempt's token and mark the unit done (only
    while the attempt holds its lease); the units waiting on it are sent on."""
    root = attempt.config.outputs_root
    with _source(root, temp.parent) as source, folder_fd(root, final.parent) as target:
        os.replace(temp.name, final.name, src_dir_fd=source, dst_dir_fd=target)
    attempt.begin_commit()
    attempt.finishing()
    _, ready = attempt.store.complete(record.id, attempt.unit, attempt.token, str(final),
                                      attempt.config.dispatch_grace_seconds, attempt.farm.ttl)
    attempt.farm.send(ready)


def _audio(attempt: Attempt, record: JobRecord, k: int) -> None:
    """A chunk's audio, frames ``first`` to ``last``: an AAC piece that joins by copying
    packets, or PCM (see :func:`melter.render.audio_piece`)."""
    _, i = chunk_place(attempt.unit)
    unit = attempt.store.unit(record.id, attempt.unit)
    chunk = int(unit["first"]), int(unit["last"])
    planned = _planned(attempt, record)
    preset, _ = _part(record.outputs[k])
    piece = audio_piece(planned, preset, chunk)
    temp = attempt_dir(attempt, record, k) / f"a{i}{piece.suffix}"
    key = (None if planned.trim
           else audio_piece_key(planned, preset, chunk, workdir=cache_dir(attempt)))
    reused = bool(key and part_ready(attempt, record, k, key, temp))
    if not reused:
        render_audio_piece(planned, preset, chunk, temp, workdir=cache_dir(attempt),
                           progress=attempt.progress,
                           stage=_staged(attempt, f"rendering audio {i + 1}"))
    attempt.check()
    final = record.tmp_dir(k) / f"a{i}.{attempt.token}{piece.suffix}"
    _note_part(attempt, record, key, reused)
    _commit_part(attempt, record, temp, final)
    if key:
        keep_part(attempt, record, k, key, final)
        release_part(attempt, key)


def _join(attempt: Attempt, record: JobRecord, k: int) -> None:
    if record.spec.prerender:
        attempt.stage("publishing the live playlist")
        _publish_live(attempt, record, k, _planned(attempt, record),
                      record.spec.chunk_seconds or attempt.config.chunk_seconds)
        _skip(attempt, record)
        return
    output = record.outputs[k]
    preset, suffix = _part(output)
    units = attempt.store.all_units(record.id)
    fields = attempt.store.job(record.id)
    taken = {int(c["i"]): c for c in json.loads(fields.get(KEPT_FIELD + str(k)) or "[]")}
    rendered = {chunk_place(name)[1]: u for name, u in units.items()
                if UnitKind.of(name) is UnitKind.VIDEO and chunk_place(name)[0] == k}
    video_units: dict[int, dict[str, Any]] = {
        **rendered, **{i: {"first": c["first"], "last": c["last"], "file": c["video"]}
                       for i, c in taken.items()}}
    chunks = sorted(video_units.items(), key=lambda item: item[0])
    audio = [{"file": taken[i]["audio"]} if i in taken else units[UnitKind.AUDIO.unit(k, i)]
             for i, _ in chunks]
    frames = sum(int(u["last"]) - int(u["first"]) + 1 for _, u in chunks)
    fps = int(record.fields.get("fps") or attempt.store.job(record.id).get("fps") or 30)
    folder = attempt_dir(attempt, record, k)
    temp = folder / f"joined{suffix}"
    sound_files = [Path(u["file"]) for u in audio]
    attempt.stage("joining")
    started = time.time()
    join_parts([Path(u["file"]) for _, u in chunks], sound_files, temp, preset, folder,
               frames=frames, fps=fps, run=_run_tracked, check=attempt.check)
    whole = PRESETS[output.preset]
    if whole.hls:
        attempt.stage("segmenting")
        playlist = folder / f"joined{output.path.suffix}"
        with atomic_playlist(playlist, whole.keyframe_seconds or 6, replace=False) as staged:
            os.replace(temp, staged)
        attempt.check()
        temp = playlist

    def kept(unit: str) -> bool:
        return (fields.get(PART_FIELD + unit) or "").startswith("reused:")

    pieces = [{"unit": UnitKind.VIDEO.unit(k, i), "frames": [int(u["first"]), int(u["last"])],
               "worker": u.get("worker"), "attempts": int(u.get("attempts") or 0),
               "seconds": _span(u), "kept": kept(UnitKind.VIDEO.unit(k, i))}
              for i, u in chunks]
    commit_outputs(attempt, record, [(k, temp)], {
        "join_s": round(time.time() - started, 3),
        "chunks": pieces,
        "audio": [{"unit": UnitKind.AUDIO.unit(k, i), "worker": u.get("worker"),
                   "attempts": int(u.get("attempts") or 0), "seconds": _span(u),
                   "kept": kept(UnitKind.AUDIO.unit(k, i))}
                  for i, u in enumerate(audio)],
    }, layout=_planned(attempt, record).layout)
    _drop_parts(attempt, record, k, [UnitKind.VIDEO.unit(k, i) for i, _ in chunks]
                + [UnitKind.AUDIO.unit(k, i) for i, _ in chunks],
                {UnitKind.VIDEO.value: suffix, UnitKind.AUDIO.value: sound_files[0].suffix})


def _span(unit: dict[str, str]) -> float | None:
    try:
        return round(float(unit["finished"]) - float(unit["started"]), 3)
    except (KeyError, ValueError):
        return None


def _run_tracked(command: list[str]) -> None:
    try:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   text=True)
    except OSError as exc:
        raise RenderError(f"{command[0]} could not start: {exc}") from None
    REGISTRY.add(process)
    try:
        _, stderr = process.communicate()
    except BaseException:
        process.kill()
        process.wait()
        raise
    finally:
        REGISTRY.discard(process)
    if process.returncode != 0:
        detail = "; ".join(stderr.strip().splitlines()[-3:]) or f"exit code {process.returncode}"
        raise RenderError(f"{command[0]} failed: {detail}")


# -- commit ------------------------------------------------------------------------------------
def commit_outputs(attempt: Attempt, record: JobRecord, rendered: list[tuple[int, Path]],
                   details: dict[str, Any], media: bool = True,
                   layout: dict[str, Any] | None = None) -> None:
    """Put finished files in place, once, and only while this attempt holds the lease.
    ``layout``: the layout document the files were rendered by, for their manifests."""
    root = attempt.config.outputs_root
    measured = {k: _measure(root, temp, PRESETS[record.outputs[k].preset].hls) if media
                else {"bytes": temp.stat().st_size} for k, temp in rendered}
    attempt.begin_commit()
    fields = attempt.store.job(record.id)
    history = attempt.store.history(record.id)
    for k, temp in rendered:
        final = record.outputs[k].path
        manifest = _manifest(attempt, record, k, fields, history, measured[k], details, layout)
        side = manifest_path(final)
        with folder_fd(root, final.parent) as target, _source(root, temp.parent) as source:
            hls = PRESETS[record.outputs[k].preset].hls
            replace = hls and _live_output(target, final.name)  # the meeting's live playlist
            if exists_at(target, final.name) and not replace:
                try:
                    owner = json.loads(read_at(target, side.name)).get("job")
                except (OSError, ValueError):
                    owner = None
                if owner != record.id:
                    raise MelterError(f"{final} exists and was not written by job "
                                      f"{record.id}; not overwriting it")
                os.unlink(temp.name, dir_fd=source)
                continue  # an earlier attempt of this job committed it before dying
            stem = None
            if hls:
                stem = _segment_stem(source, temp.name, target, final.name, side.name,
                                     record.id, manifest)
            text = json.dumps(manifest, indent=2, sort_keys=False) + "\n"
            write_at(target, side.name, text.encode(), file_mode())
            if stem is None:
                _link(source, temp.name, target, final.name)
            else:
                place(source, temp.name, target, final.name, replace=replace,
                      mode=file_mode(), stem=stem)
    attempt.finishing()
    status, _ = attempt.store.complete(
        record.id, attempt.unit, attempt.token, ",".join(str(record.outputs[k].path)
                                                         for k, _ in rendered),
        attempt.config.dispatch_grace_seconds, attempt.farm.ttl)
    if status == "done":
        for k in range(len(record.outputs)):
            remove_tmp(record.tmp_dir(k))


def _measure(root: Path, path: Path, hls: bool) -> dict[str, Any]:
    """``measure`` of a file, or of a playlist read through its segments (whose names the
    manifest gets when they are chosen) and their bytes."""
    info = measure(path)
    if hls:
        with _source(root, path.parent) as folder:
            staged = read_playlist(folder, path.name)
            info["segment_bytes"] = sum(os.stat(name, dir_fd=folder, follow_symlinks=False)
                                        .st_size for name, _ in staged.segments)
    return info


def _segment_stem(source: int, staged: str, target: int, final: str, side: str, job: str,
                  manifest: dict[str, Any]) -> str:
    """The stem of a playlist's segment names, recorded in its manifest before they are
    linked. Segments an earlier attempt of the job linked before it died (its manifest names
    them, and there is no playlist) are removed first: nothing else names them."""
    try:
        earlier = json.loads(read_at(target, side))
    except (OSError, ValueError):
        earlier = None
    if isinstance(earlier, dict) and earlier.get("job") == job:
        for name in (earlier.get("output") or {}).get("segments") or []:
            if isinstance(name, str) and named_after(final, name):
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=target)
    stem = free_stem(target, Path(final).stem)
    count = len(read_playlist(source, staged).segments)
    manifest["output"]["segments"] = [segment_name(stem, i) for i in range(count)]
    return stem


def _link(source: int, temp: str, target: int, final: str) -> None:
    """Make ``temp`` (in the folder ``source``) appear as ``final`` (in ``target``) in one
    step, never replacing an existing file; both folders are descriptors, so neither name is
    looked up through a link."""
    handle = os.open(temp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=source)
    try:
        os.fchmod(handle, file_mode())  # the temporary file was private to the worker
    finally:
        os.close(handle)
    link_new(source, temp, target, final)
    with contextlib.suppress(FileNotFoundError):  # renamed where there are no hard links
        os.unlink(temp, dir_fd=source)


def _manifest(attempt: Attempt, record: JobRecord, k: int, fields: dict[str, str],
              history: list[dict[str, Any]], output: dict[str, Any],
              details: dict[str, Any], layout: dict[str, Any] | None) -> dict[str, Any]:
    spec = record.spec
    now = time.time()
    created = float(fields.get("created") or record.created)
    started = float(fields.get("started") or attempt.started)
    inputs = json.loads(fields.get("inputs_info") or "null")
    if inputs is None:
        inputs = describe_inputs(checked_inputs(record, attempt.config.storage_root),
                                 attempt.config.storage_root)
    target = record.outputs[k]
    return {
        "manifest": 1,
        "job": record.id,
        "output": {"path": str(target.path), "requested": target.requested,
                   "preset": target.preset, **output},
        "attempt": {"unit": attempt.unit, "number": attempt.number, "token": int(attempt.token),
                    "worker": attempt.worker, "pid": os.getpid()},
        "attempts": int(fields.get("attempts") or attempt.number),
        "previous_attempts": [h for h in history if h.get("outcome") not in ("done", "planned")],
        "layout": {
            "source": spec.layout if isinstance(spec.layout, str) else "inline",
            "document": layout,
        },
        "inputs": inputs,
        "meeting": json.loads(fields.get("meeting") or "null"),
        "options": {"trim": spec.trim, "room": spec.room, "priority": spec.priority,
                    "chunk_seconds": spec.chunk_seconds},
        "tools": tool_versions(),
        "timings": {
            "submitted": iso(created),
            "started": iso(started),
            "finished": iso(now),
            "queued_s": round(started - created, 3),
            "running_s": round(now - started, 3),
            "total_s": round(now - created, 3),
            **details,
        },
        "metadata": spec.metadata,
    }

