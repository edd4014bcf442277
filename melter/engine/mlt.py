"""The MLT engine: a scene plan becomes an MLT XML document, rendered by ``melt``.

Document shape: track 0 is the background; each prepared segment is one track (a playlist
with a blank up to the segment's first frame, then the segment's file); placeholder cards are
tracks of ``color`` producers, and names and initials tracks of ``pango`` titles. Every placement of
every scene is a ``composite`` transition onto track 0 limited to the scene's frames
(``crop_to_fill`` for crop fit, ``fill`` with centred alignment for letterbox); each audio track
is mixed into track 0 with ``mix sum=1`` (without ``sum`` every step halves the level).
Every segment's pictures reach MLT through an FFmpeg ``lavfi`` graph (see :func:`_source_graph`)
that turns them upright, scales them to their cell (one producer per cell size; a segment's
video track switches between them) and resamples them to the output frame rate, each picture
from the output frame nearest its own time: MLT then shows source frame n on output frame n,
whatever rate the publisher sent at. A trimmed document (see :class:`DocumentOptions`) plays
that composition through a playlist of the spans that have media, so the trimmed timeline is
the meeting's frames without the stretches where nobody is present.

melt's exit code means little (a missing input, a malformed document or an unknown codec all
exit 0): inputs are checked before, stderr is scanned for the errors melt prints, and the
caller checks the output file after.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import re
import selectors
import shutil
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from melter.compose import PreparedSegment
from melter.errors import MelterError
from melter.plan import VIDEO_OFF_US, Plan, Rect
from melter.proctree import descendants

log = logging.getLogger(__name__)

_PROGRESS = re.compile(r"Current Frame:\s*(\d+),\s*percentage:\s*(\d+)")
_ERRORS = (
    re.compile(r"failed to load", re.IGNORECASE),
    re.compile(r"requires a X11", re.IGNORECASE),
    re.compile(r"\[error\]", re.IGNORECASE),
    re.compile(r"Failed to open", re.IGNORECASE),
    re.compile(r"Unable to (?:find|open)", re.IGNORECASE),
)


#: What melt's avformat consumer prints when a write fails (the number is -errno).
_WRITE_FAILED = re.compile(r"error writing (?:video|audio) frame: -(\d+)")


class RenderError(MelterError):
    """melt failed, or produced something other than what was asked."""


@dataclass(frozen=True)
class Output:
    """One rendition: a file and the avformat consumer's properties for it."""

    path: Path
    properties: dict[str, str]
    width: int
    height: int
    audio_only: bool = False


@dataclass
class Document:
    xml: str
    frames: int
    fps: int
    warnings: list[str] = field(default_factory=list)


def _frame(us: int, fps: int) -> int:
    return round(us * fps / 1_000_000)


def _scaled(rect: Rect, sx: float, sy: float) -> Rect:
    x0, y0 = round(rect.x * sx), round(rect.y * sy)
    x1, y1 = round((rect.x + rect.width) * sx), round((rect.y + rect.height) * sy)
    return Rect(x0, y0, max(2, x1 - x0), max(2, y1 - y0))


def _geometry(rect: Rect) -> str:
    return f"{rect.x}/{rect.y}:{rect.width}x{rect.height}:100"


def _initials(name: str) -> str:
    words = [w for w in re.split(r"[\s._-]+", name) if w]
    if not words:
        return "?"
    letters = (words[0][0] + (words[1][0] if len(words) > 1 else "")).upper()
    return letters


def mlt_colour(colour: str) -> str:
    """``#RRGGBB`` or web-style ``#RRGGBBAA`` to MLT's ``#AARRGGBB``."""
    if len(colour) == 9:
        return "#" + colour[7:9] + colour[1:7]
    return colour


def _prop(parent: ET.Element, name: str, value: object) -> None:
    ET.SubElement(parent, "property", name=name).text = str(value)


@dataclass(frozen=True)
class Style:
    """How a layout draws what the plan places: names, placeholder cards, the background."""

    labels: bool = True
    label_size: int = 20
    label_color: str = "#ffffff"
    label_background: str = "#00000099"
    font: str = "DejaVu Sans"
    placeholder_text: str = "initials"
    placeholder_color: str = "#3a3a4a"
    placeholder_text_color: str = "#ffffff"
    background_image: str | None = None


@dataclass(frozen=True)
class DocumentOptions:
    """What one MLT document of a plan shows, and at which size.

    ``prescale``: sources reach MLT already at their cells' sizes (see :func:`_picture`);
    without it MLT scales them.
    ``window``: only output frames ``first`` to ``last`` will be rendered (melt's ``in`` and
    ``out``): each video source starts reading at ``first`` instead of decoding its file from
    the start (the sources cannot seek, see :func:`_source_graph`), so the document shows
    those frames only. With ``trim``, these are frames of the trimmed timeline.
    ``mix_audio``: all audio comes mixed from one input (see :func:`_audio_mix`), read from
    the window's first frame (or the timeline's) to its last without a jump.
    ``trim``: the document's timeline leaves out the stretches where nobody is present (see
    :func:`trim_spans`).
    ``colorspace``: the profile's (601 or 709), when the caller decides it (a chunk's document
    holds only the media up to the chunk, but must match the whole meeting's); else from the
    media.
    ``heard``: the segments whose audio is mixed, when the caller decides it (a chunk's
    document mixes what the whole meeting's does: a voice heard in scenes after the chunk may
    start inside it); else those in the plan's scenes.
    """

    width: int
    height: int
    style: Style = Style()
    audio_only: bool = False
    prescale: bool = True
    mix_audio: bool = False
    window: tuple[int, int] | None = None
    trim: bool = False
    colorspace: int | None = None
    heard: frozenset[str] | None = None


def colorspace_of(media: dict[str, PreparedSegment]) -> int:
    """MLT takes SD sources as BT.601; a 709 profile would convert every source picture's
    matrix on every frame. Match the sources when they are all SD."""
    heights = [m.height for m in media.values() if m.has_video]
    return 601 if heights and max(heights) <= 576 else 709


def trim_spans(plan: Plan) -> list[tuple[int, int]]:
    """Frame spans that have media (a trimmed render drops the stretches where nobody is
    present)."""
    spans: list[tuple[int, int]] = []
    fps = plan.fps
    for scene in plan.scenes:
        if not scene.placements and not scene.audio:
            continue
        first = round(scene.start_us * fps / 1e6)
        last = round(scene.end_us * fps / 1e6) - 1
        if spans and spans[-1][1] + 1 >= first:
            spans[-1] = (spans[-1][0], last)
        elif last >= first:
            spans.append((first, last))
    return spans


def _untrimmed(frame: int, spans: list[tuple[int, int]]) -> int:
    """The meeting's frame that frame ``frame`` of the trimmed timeline shows."""
    for first, last in spans:
        if frame <= last - first:
            return first + frame
        frame -= last - first + 1
    return spans[-1][1] if spans else frame


def build_document(plan: Plan, media: dict[str, PreparedSegment],
                   options: DocumentOptions) -> Document:
    """The MLT XML for ``plan`` at ``options.width`` x ``options.height`` (rects scale from the
    plan's canvas)."""
    width, height, style = options.width, options.height, options.style
    labels, audio_only, prescale = style.labels, options.audio_only, options.prescale
    placeholder_text, placeholder_color = style.placeholder_text, style.placeholder_color
    label_size, label_color = style.label_size, style.label_color
    label_background, font = style.label_background, style.font
    kept = trim_spans(plan) if options.trim else []
    window = options.window
    if window is not None and options.trim:
        window = (_untrimmed(window[0], kept), _untrimmed(window[1], kept))
    fps = plan.fps
    frames = max(1, round(plan.duration_us * fps / 1_000_000))
    sx, sy = width / plan.width, height / plan.height
    colorspace = options.colorspace or colorspace_of(media)
    root = ET.Element("mlt", LC_NUMERIC="C", producer="main")
    ET.SubElement(
        root, "profile", description="melter", width=str(width), height=str(height),
        progressive="1", sample_aspect_num="1", sample_aspect_den="1",
        display_aspect_num=str(width), display_aspect_den=str(height),
        frame_rate_num=str(fps), frame_rate_den="1", colorspace=str(colorspace),
    )
    background = ET.SubElement(root, "producer", id="background",
                               attrib={"in": "0", "out": str(frames - 1)})
    if style.background_image:
        service = "qimage" if style.background_image.endswith(".svg") else "pixbuf"
        _prop(background, "mlt_service", service)
        _prop(background, "resource", style.background_image)
    else:
        _prop(background, "mlt_service", "color")
        _prop(background, "resource", mlt_colour(plan.background))
    _prop(background, "length", frames)
    background_playlist = ET.SubElement(root, "playlist", id="track0")
    ET.SubElement(background_playlist, "entry", producer="background",
                  attrib={"in": "0", "out": str(frames - 1)})

    tracks: list[str] = ["track0"]
    transitions: list[dict[str, str]] = []
    track_of: dict[str, int] = {}
    # Each segment is two tracks from one file: its audio for the whole segment (mixed), and
    # its video only where a placement shows it. A track with a picture and no transition on
    # a frame would otherwise cover the whole canvas (MLT shows the top track then).
    # With ``prescale``, a segment shown at several picture sizes gets one producer per size,
    # each delivering its pictures already at that size; otherwise one producer.
    # Names FFmpeg draws into those pictures need no title track (see _drawtext).
    shown: dict[str, dict[_Picture | None, list[tuple[int, int]]]] = {}
    drawn: set[tuple[int, int]] = set()
    label_px = max(8, round(label_size * sy))
    for scene_number, scene in enumerate(plan.scenes):
        first = _frame(scene.start_us, fps)
        last = min(frames, _frame(scene.end_us, fps)) - 1
        for number, placement in enumerate(scene.placements):
            if placement.video and not audio_only and last >= first:
                cell = _scaled(placement.rect, sx, sy)
                picture = _picture(placement.segment, cell, placement.fit, media, prescale)
                if labels and picture is not None and picture.fit == "crop":
                    label = _drawn_label(placement.display, label_px, cell, label_color,
                                         label_background, font)
                    if label is not None:
                        picture = replace(picture, label=label)
                        drawn.add((scene_number, number))
                by_size = shown.setdefault(placement.segment, {})
                by_size.setdefault(picture, []).append((first, last))
    def audio_track(producer_id: str, start: int, last: int) -> None:
        """A track playing ``producer_id`` from frame ``start`` (its frames 0 to ``last``),
        mixed into track 0."""
        playlist = ET.SubElement(root, "playlist", id=f"track{len(tracks)}")
        if start > 0:
            ET.SubElement(playlist, "blank", length=str(start))
        ET.SubElement(playlist, "entry", producer=producer_id,
                      attrib={"in": "0", "out": str(last)})
        transitions.append({"mlt_service": "mix", "a_track": "0",
                            "b_track": str(len(tracks)), "sum": "1", "always_active": "1"})
        tracks.append(playlist.get("id") or "")

    heard = (set(options.heard) if options.heard is not None
             else {seg for s in plan.scenes for seg in s.audio})
    audible = [media[seg] for seg in sorted(heard) if media[seg].has_audio]
    span = (window[0], min(window[1], frames - 1)) if window else (0, frames - 1)
    mix = _audio_mix(audible, span, fps) if options.mix_audio else None
    if mix is not None:
        length = span[1] - span[0] + 1
        producer = ET.SubElement(root, "producer", id="mix",
                                 attrib={"in": "0", "out": str(length - 1)})
        _prop(producer, "mlt_service", "avformat-novalidate")
        _prop(producer, "resource", mix)
        _prop(producer, "length", length)
        _prop(producer, "video_index", -1)
        audio_track("mix", span[0], length - 1)
    for number, segment_id in enumerate(sorted(set(shown) | heard)):
        prepared = media[segment_id]
        end = min(prepared.frames, frames - prepared.start_frame) - 1
        if segment_id in heard and prepared.has_audio and mix is None:
            _audio_producer(root, f"seg{number}a", prepared)
            audio_track(f"seg{number}a", prepared.start_frame, end)
        if segment_id not in shown or not prepared.has_video:
            continue
        # One track per segment: its entries switch between the producers of each size,
        # which start reading the file at the window's first frame.
        skip = max(0, window[0] - prepared.start_frame) if window else 0
        entries: list[tuple[int, int, _Picture | None]] = []
        for first, last, picture in _picture_runs(shown[segment_id]):
            first = max(first, prepared.start_frame + skip)
            last = min(last, prepared.start_frame + end)
            if last >= first:
                entries.append((first, last, picture))
        producers: dict[_Picture | None, str] = {}
        for _, _, picture in entries:
            if picture not in producers:
                producers[picture] = f"seg{number}v{len(producers) or ''}"
                _video_producer(root, producers[picture], prepared, picture, fps, skip)
        playlist = ET.SubElement(root, "playlist", id=f"track{len(tracks)}")
        cursor = 0
        for first, last, picture in entries:
            if first > cursor:
                ET.SubElement(playlist, "blank", length=str(first - cursor))
            ET.SubElement(playlist, "entry", producer=producers[picture],
                          attrib={"in": str(first - prepared.start_frame - skip),
                                  "out": str(last - prepared.start_frame - skip)})
            cursor = last + 1
        track_of[segment_id] = len(tracks)
        tracks.append(playlist.get("id") or "")

    def card_track(name: str, entries: list[tuple[int, int]], color: str) -> int:
        """A track of colour cards, one entry per (first, last frame).

        Producers go before the playlist that uses them: MLT resolves ids as it reads.
        """
        ids = []
        for index, (first, last) in enumerate(entries):
            producer_id = f"{name}{index}"
            ids.append(producer_id)
            producer = ET.SubElement(root, "producer", id=producer_id,
                                     attrib={"in": "0", "out": str(last - first)})
            _prop(producer, "mlt_service", "color")
            _prop(producer, "resource", color)
            _prop(producer, "length", last - first + 1)
        playlist = ET.SubElement(root, "playlist", id=f"track{len(tracks)}")
        cursor = 0
        for producer_id, (first, last) in zip(ids, entries, strict=True):
            if first > cursor:
                ET.SubElement(playlist, "blank", length=str(first - cursor))
            ET.SubElement(playlist, "entry", producer=producer_id,
                          attrib={"in": "0", "out": str(last - first)})
            cursor = last + 1
        tracks.append(playlist.get("id") or "")
        return len(tracks) - 1

    # Text is drawn by filters on the tractor, on the finished picture at 1:1 scale (a text
    # card composited into a cell would be scaled with it), and only between in and out.
    texts: list[dict[str, str]] = []
    cards: dict[tuple[str, Rect], list[tuple[int, int]]] = {}
    for scene_number, scene in enumerate(plan.scenes):
        first = _frame(scene.start_us, fps)
        last = min(frames, _frame(scene.end_us, fps)) - 1
        if last < first:
            continue
        for number, placement in enumerate(scene.placements):
            cell = _scaled(placement.rect, sx, sy)
            if audio_only:
                continue
            if placement.video and placement.segment in track_of:
                transition = {
                    "mlt_service": "composite", "a_track": "0",
                    "b_track": str(track_of[placement.segment]),
                    "in": str(first), "out": str(last),
                    "geometry": _geometry(cell), "halign": "centre", "valign": "middle",
                    "fill": "1", "aligned": "1", "progressive": "1",
                }
                if placement.fit == "crop":
                    transition["crop_to_fill"] = "1"
                transitions.append(transition)
            else:
                cards.setdefault((placement.segment, cell), []).append((first, last))
                text = {"initials": _initials(placement.display), "name": placement.display,
                        "none": ""}[placeholder_text]
                if text:
                    card_size = max(12, min(cell.height // 3, cell.width // 4))
                    texts.append({
                        "in": str(first), "out": str(last), "text": text, "pad": "0",
                        "geometry": _geometry(cell), "size": str(card_size),
                        "halign": "center", "valign": "middle",
                        "fgcolour": mlt_colour(style.placeholder_text_color),
                        "bgcolour": "#00000000",
                    })
            if (labels and (placement.video or placeholder_text != "name")
                    and (scene_number, number) not in drawn):
                size = label_px
                inset = Rect(cell.x + 4, cell.y, cell.width - 8, cell.height - 4)
                texts.append({
                    "in": str(first), "out": str(last),
                    "text": placement.display, "pad": "6",
                    "geometry": _geometry(inset), "size": str(size),
                    "halign": "left", "valign": "bottom",
                    "fgcolour": mlt_colour(label_color), "bgcolour": mlt_colour(label_background),
                })
    for (_, cell), spans in cards.items():
        merged = _merge_spans(spans)
        track = card_track(f"card{len(tracks)}", merged, mlt_colour(placeholder_color))
        for first, last in merged:
            transitions.append({
                "mlt_service": "composite", "a_track": "0", "b_track": str(track),
                "in": str(first), "out": str(last), "geometry": _geometry(cell),
                "distort": "1", "progressive": "1",
            })

    # Texts last, so they lie over the pictures and cards they label. Texts that never show
    # at once share a track: every track costs melt a frame request on every output frame.
    for lane, specs in enumerate(_lanes(_merge_texts(texts))):
        tracks.append(_text_track(root, f"text{lane}_", specs, font, len(tracks)))
        for spec in specs:
            transitions.append({
                "mlt_service": "composite", "a_track": "0", "b_track": str(len(tracks) - 1),
                "in": spec["in"], "out": spec["out"], "geometry": spec["geometry"],
                "halign": spec["halign"], "valign": spec["valign"],
                "aligned": "1", "distort": "0", "progressive": "1",
            })

    tractor = ET.SubElement(root, "tractor", id="main", attrib={"in": "0", "out": str(frames - 1)})
    multitrack = ET.SubElement(tractor, "multitrack")
    for track_id in tracks:
        ET.SubElement(multitrack, "track", producer=track_id)
    for spec in transitions:
        element = ET.SubElement(tractor, "transition")
        for bound in ("in", "out"):
            if bound in spec:
                element.set(bound, spec.pop(bound))
        for key, value in spec.items():
            _prop(element, key, value)
    if options.trim:
        # The trimmed timeline: the composition's frames that have media, one after another.
        root.set("producer", "trimmed")
        trimmed = ET.SubElement(root, "playlist", id="trimmed")
        for first, last in kept:
            ET.SubElement(trimmed, "entry",
                          attrib={"producer": "main", "in": str(first), "out": str(last)})
        frames = sum(last - first + 1 for first, last in kept)
    ET.indent(root)
    xml = '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode")
    return Document(xml, frames, fps)


@dataclass(frozen=True)
class _Label:
    """A name FFmpeg's ``drawtext`` writes into a segment's scaled pictures (see
    :func:`_drawn_label`)."""

    text: str
    size: int
    colour: str
    background: str
    font: str


@dataclass(frozen=True)
class _Picture:
    """The size a segment's pictures are scaled to before MLT sees them, and how."""

    width: int
    height: int
    fit: str
    label: _Label | None = None


def _picture(segment: str, cell: Rect, fit: str, media: dict[str, PreparedSegment],
             prescale: bool) -> _Picture | None:
    """Whether (and to what) FFmpeg scales a segment's pictures for ``cell``.

    MLT 7.12 scales every source on every output frame, in packed 4:2:2 with its most exact
    (and slowest) swscale flags, even when the output has twice the source's frame rate: for
    a four-person 720p grid that is most of what melt spends beyond ffmpeg. A source whose
    pictures already have the cell's size is not scaled at all. So the source's graph scales
    (bilinear, once per source picture, as an ffmpeg command would) and crops for a crop
    fit. Odd sizes (which MLT's 4:2:2 pictures cannot have) are left to MLT.
    """
    prepared = media.get(segment)
    if not prescale or prepared is None or not prepared.has_video:
        return None
    if cell.width % 2 or cell.height % 2:
        return None
    return _Picture(cell.width, cell.height, fit)


def _source_graph(prepared: PreparedSegment, picture: _Picture | None, fps: int,
                  skip: int) -> str:
    """The ``lavfi`` input that hands MLT one segment's pictures, ``skip`` frames in.

    MLT's own reader numbers a file's pictures by rounding their times to the rate it guesses
    for the file and shows, at each output frame, the first picture whose number is not
    below the frame's: pictures land early or late by up to a source interval, by an amount
    that depends on the source's rate, and a variable rate defeats any fixed correction.
    Here FFmpeg's ``fps`` filter resamples the pictures to the output rate instead: output
    frame n shows the last picture whose time rounds to n or before it, so each picture is
    shown from the output frame nearest its own time until the next one takes over, and MLT
    maps the resampled frames one to one. The first picture is repeated back to the
    segment's first frame (``start_time``).

    Such an input cannot seek; a render that starts mid-meeting (``skip``) makes ``movie``
    seek to the key frame before it instead, and drops what lies more than the longest
    picture hold (see :data:`melter.plan.VIDEO_OFF_US`) before it without scaling it.
    """
    start = skip / fps
    source = f"movie={graph_path(prepared.path)}:dec_threads=1"
    filters = [source]
    if skip:
        filters[0] += f":seek_point={start:.6f}"
        filters.append(f"trim=start={max(0.0, start - VIDEO_OFF_US / 1e6 - 0.5):.6f}")
    filters += _upright(prepared.rotation, prepared.flip)
    if picture is not None:
        filters.append(_fitted(picture))
        # A scaled picture keeps a non-square pixel aspect otherwise, and MLT would scale
        # it again to square pixels.
        filters.append("setsar=1")
    # yuyv422: MLT's working format, converted here once per source picture; MLT then only
    # copies it on each output frame.
    filters.append("format=yuyv422")
    # ``fps`` places pictures relative to ``start_time`` rounded to the input's time base:
    # in milliseconds, a window starting between two of them (frame 1 at 30 fps) would move
    # every picture by up to a third of a millisecond against a whole render, and one that
    # close to a midpoint between output frames would show a frame early or late. A time
    # base of 1 / (1000 * fps) holds both the prepared files' milliseconds and every frame
    # start exactly.
    filters.append(f"settb=1/{1000 * fps}")
    filters.append(f"fps=fps={fps}:start_time={start:.6f}:round=near")
    # The last picture is held to the segment's end: ``fps`` stops at it, and MLT would show
    # a blank picture for the frames it is asked for beyond.
    filters.append(f"tpad=stop_mode=clone:stop={max(1, prepared.frames - skip)}")
    return "lavfi:" + ",".join(filters)


def _upright(rotation: int, flip: bool) -> list[str]:
    """Filters that turn pictures ``rotation`` degrees clockwise, then mirror them if
    ``flip`` (as the display matrix ``convert`` writes for the orientation extension)."""
    turns = {90: ["transpose=clock"], 180: ["hflip", "vflip"], 270: ["transpose=cclock"]}
    return turns.get(rotation, []) + (["hflip"] if flip else [])


def _fitted(picture: _Picture) -> str:
    width, height = picture.width, picture.height
    if picture.fit == "crop":
        fitted = (f"scale=w={width}:h={height}:force_original_aspect_ratio=increase"
                  f":flags=bilinear,crop={width}:{height}")
    else:
        fitted = (f"scale=w={width}:h={height}:force_original_aspect_ratio=decrease"
                  f":force_divisible_by=2:flags=bilinear")
    return fitted + (_drawtext(picture.label) if picture.label else "")


#: Characters a media path may hold to go into an FFmpeg filter graph without escaping.
_PLAIN_PATH = re.compile(r"[A-Za-z0-9/._+-]+")


def graph_path(path: Path) -> str:
    """``path`` as a file name option of a ``lavfi`` input: escaped for FFmpeg's graph
    parser where needed, and with ``?`` escaped for MLT, which would take the rest for a
    query string."""
    text = str(path)
    if _PLAIN_PATH.fullmatch(text):
        return text
    return _graph_value(text).replace("?", "\\?")


#: Zero-width marks that reach below the baseline and above the ascenders (cedilla, double
#: acute): appended to the text of the box's pass, they give every name's box one height.
_STRUTS = "\u0327\u030b"
#: DejaVu Sans's descent, in ems: the baseline sits that far above the box's lower padding.
_DESCENT_EM = 0.236


def _drawtext(label: _Label) -> str:
    """Two ``drawtext`` passes writing ``label`` into the bottom-left corner of the picture.

    The layout of MLT's ``pango`` titles: 4 pixels in from the cell's left and bottom edges,
    6 pixels of box around the text. The first pass draws only the box (transparent text,
    with struts so the box does not depend on the letters), the second the letters, both on
    one baseline. No extra MLT track or transition is needed, which melt would pay for on
    every output frame (``bench/README.md``).
    """
    size = label.size
    baseline = f"h-10-{round(size * _DESCENT_EM)}-max_glyph_a"
    common = (f"font={_graph_value(label.font)}:expansion=none:fontsize={size}"
              f":x=10:y={baseline}")
    box = (f"drawtext=text={_graph_value(label.text + _STRUTS)}:{common}:fontcolor=0x00000000"
           f":box=1:boxcolor={_ffmpeg_colour(label.background)}:boxborderw=6")
    text = (f"drawtext=text={_graph_value(label.text)}:{common}"
            f":fontcolor={_ffmpeg_colour(label.colour)}")
    return f",{box},{text}"


def _graph_value(text: str) -> str:
    """``text`` as one option value in an FFmpeg filter graph: quoted for the filter's option
    parser, then escaped for the graph parser (FFmpeg's "Notes on filtergraph escaping")."""
    quoted = "'" + text.replace("'", "'\\''") + "'"
    return re.sub(r"([\\'\[\],;])", r"\\\1", quoted)


def _ffmpeg_colour(colour: str) -> str:
    """``#RRGGBB`` or ``#RRGGBBAA`` as FFmpeg's ``0xRRGGBB[AA]``."""
    return "0x" + colour[1:]


#: Scripts DejaVu Sans covers and ``drawtext`` lays out right without text shaping: Latin,
#: Greek and Cyrillic (others keep MLT's ``pango`` titles, which shape and fall back).
_DRAWABLE = re.compile(r"[\u0020-\u007e\u00a0-\u024f\u0370-\u03ff\u0400-\u04ff]+")


def _drawn_label(text: str, size: int, cell: Rect, colour: str, background: str,
                 font: str) -> _Label | None:
    """A label FFmpeg can draw in place of a ``pango`` title, or None.

    Only in the default font (its metrics set the box), for text in the scripts above, and
    for names sure to fit their cell at one em a character (a longer one keeps ``pango``,
    which shrinks it to fit). No ``?``: MLT would take it for a query string in the input's
    name.
    """
    if font != "DejaVu Sans" or not _DRAWABLE.fullmatch(text) or "?" in text:
        return None
    if len(text) * size > cell.width - 8 - 12 or size + 16 > cell.height:
        return None
    return _Label(text, size, colour, background, font)


#: The mix's sample rate: the output presets' rate, so MLT does not resample it.
MIX_RATE = 48000
#: How long before a window's first sample its audio files are decoded (see :func:`_audio_mix`).
AUDIO_PREROLL_S = 1.0


def _audio_mix(segments: list[PreparedSegment], span: tuple[int, int], fps: int) -> str | None:
    """One ``lavfi`` input mixing every heard segment over frames ``span`` (first, last), or
    None where that cannot be built.

    In MLT each segment's audio would be a track of its own, with a ``mix`` transition, and
    melt pays for every track and transition on every output frame (a four-person meeting:
    about 1.5 s of CPU a minute, against 0.2 s for FFmpeg's mix of the same audio). Each
    input is padded from its file's time zero (``first_pts``), started where MLT starts the
    segment (its first video key frame, which prepare_media puts at zero, see
    :class:`PreparedSegment`), cut where the segment's entry would end, and delayed to its
    first output frame, all counted in samples. Mono is copied into both channels at full
    level, as MLT does (FFmpeg's own upmix would lower it by 3 dB); files of more channels
    keep their tracks.

    A span that starts later (a window of a long meeting) reads each file from
    :data:`AUDIO_PREROLL_S` before its first sample there, not from its start: the decoder
    runs in for that second and is cut at the same sample a whole render reaches, so windows
    put end to end hold the whole render's samples, without a gap or a repeat at a border.
    The producer itself cannot seek: it is read from its first frame to its last.
    """
    if not segments:
        return None
    if any(m.audio_channels not in (1, 2) for m in segments):
        return None
    window_start, window_end = _samples(span[0], fps), _samples(span[1] + 1, fps)
    chains: list[str] = []
    labels: list[str] = []
    for prepared in segments:
        last = min(prepared.frames, round(window_end * fps / MIX_RATE) - prepared.start_frame)
        delay = _samples(prepared.start_frame, fps)
        begin = max(window_start, delay) - delay
        end = min(window_end, delay + _samples(last, fps)) - delay
        if end <= begin:
            continue
        # A WAV of its own already starts at the key frame (see PreparedSegment.audio_path).
        skip = 0 if prepared.audio_path else round(prepared.first_video_us * MIX_RATE / 1e6)
        seek = max(0.0, (skip + begin) / MIX_RATE - AUDIO_PREROLL_S)
        source = graph_path(prepared.audio_file)
        upmix = ",pan=stereo|c0=c0|c1=c0" if prepared.audio_channels == 1 else ""
        if seek > 0:
            # Samples placed by their timestamps (in samples at the mix's rate): padding the
            # read back to the file's time zero instead (``first_pts=0``) and counting would
            # make every window pay for silence as long as the meeting before it.
            lag = prepared.audio_lag
            source += f":seek_point={seek:.6f}"
            read = (f"aresample={MIX_RATE}{upmix},"
                    f"aformat=sample_fmts=fltp:channel_layouts=stereo,"
                    f"atrim=start_pts={skip + begin - lag}:end_pts={skip + end - lag}")
        else:
            read = (f"aresample={MIX_RATE}:first_pts=0{upmix},"
                    f"aformat=sample_fmts=fltp:channel_layouts=stereo,"
                    f"atrim=start_sample={skip + begin}:end_sample={skip + end}")
        number = len(chains)
        chains.append(
            f"amovie={source},{read},asetpts=PTS-STARTPTS,"
            f"adelay=delays={delay + begin - window_start}S:all=1[a{number}]")
        labels.append(f"[a{number}]")
    if not chains:
        return None
    total = window_end - window_start
    mixed = (f"amix=inputs={len(chains)}:normalize=0:duration=longest"
             if len(chains) > 1 else "anull")
    return (f"lavfi:{';'.join(chains)};{''.join(labels)}{mixed},"
            f"apad=whole_len={total},atrim=end_sample={total}")


def _samples(frames: int, fps: int) -> int:
    return round(frames * MIX_RATE / fps)


def _audio_producer(root: ET.Element, producer_id: str, prepared: PreparedSegment) -> None:
    """A segment's audio as MLT reads it from the prepared file (see :func:`_audio_mix` for
    the single input that usually replaces these)."""
    producer = ET.SubElement(root, "producer", id=producer_id,
                             attrib={"in": "0", "out": str(prepared.frames - 1)})
    _prop(producer, "mlt_service", "avformat-novalidate")
    _prop(producer, "resource", str(prepared.audio_file))
    _prop(producer, "length", prepared.frames)
    _prop(producer, "seekable", 1)
    _prop(producer, "threads", 1)
    # One decoder per producer: the audio track never decodes pictures.
    _prop(producer, "video_index", -1)


def _video_producer(root: ET.Element, producer_id: str, prepared: PreparedSegment,
                    picture: _Picture | None, fps: int, skip: int) -> None:
    """A segment's pictures through :func:`_source_graph`, from frame ``skip`` of the
    segment on (the producer's frame 0)."""
    length = max(1, prepared.frames - skip)
    producer = ET.SubElement(root, "producer", id=producer_id,
                             attrib={"in": "0", "out": str(length - 1)})
    _prop(producer, "mlt_service", "avformat-novalidate")
    _prop(producer, "resource", _source_graph(prepared, picture, fps, skip))
    _prop(producer, "length", length)
    # MLT guesses BT.709 for pictures taller than 576 lines; scaled-up SD stays 601.
    _prop(producer, "force_colorspace", 601 if prepared.height <= 576 else 709)
    _prop(producer, "audio_index", -1)


def _text_track(root: ET.Element, name: str, specs: list[dict[str, str]], font: str,
                number: int) -> str:
    """A track of ``pango`` titles, each from its spec's in to out; returns the track's id.

    A title is drawn once, at its own size, and laid over the canvas by a ``composite``
    transition in MLT's 4:2:2 working format. (``dynamictext`` filters on the tractor cost
    several times more: each one converts the whole canvas to RGBA and back on every frame.)
    A title wider than its box is scaled down to fit (``aligned`` without ``fill``).
    The specs must not overlap in time (see :func:`_lanes`).
    """
    ids = []
    for index, spec in enumerate(specs):
        first, last = int(spec["in"]), int(spec["out"])
        ids.append(f"{name}{index}")
        producer = ET.SubElement(root, "producer", id=ids[-1],
                                 attrib={"in": "0", "out": str(last - first)})
        _prop(producer, "mlt_service", "pango")
        _prop(producer, "text", spec["text"])
        _prop(producer, "family", font)
        _prop(producer, "size", spec["size"])
        _prop(producer, "fgcolour", spec["fgcolour"])
        _prop(producer, "bgcolour", spec["bgcolour"])
        _prop(producer, "pad", spec["pad"])
        _prop(producer, "length", last - first + 1)
    playlist = ET.SubElement(root, "playlist", id=f"track{number}")
    cursor = 0
    for producer_id, spec in zip(ids, specs, strict=True):
        first, last = int(spec["in"]), int(spec["out"])
        if first > cursor:
            ET.SubElement(playlist, "blank", length=str(first - cursor))
        ET.SubElement(playlist, "entry", producer=producer_id,
                      attrib={"in": "0", "out": str(last - first)})
        cursor = last + 1
    return playlist.get("id") or ""


def _lanes(specs: list[dict[str, str]]) -> list[list[dict[str, str]]]:
    """Texts sorted into as few tracks as possible, none overlapping another in its track."""
    lanes: list[list[dict[str, str]]] = []
    for spec in sorted(specs, key=lambda t: int(t["in"])):
        lane = next((lane for lane in lanes if int(lane[-1]["out"]) < int(spec["in"])), None)
        if lane is None:
            lanes.append([spec])
        else:
            lane.append(spec)
    return lanes


def _picture_runs(
    by_picture: dict[_Picture | None, list[tuple[int, int]]],
) -> list[tuple[int, int, _Picture | None]]:
    """A segment's shown frames in order, as (first, last, picture size) runs."""
    spans = sorted(((first, last, picture) for picture, pairs in by_picture.items()
                    for first, last in pairs), key=lambda span: span[0])
    runs: list[tuple[int, int, _Picture | None]] = []
    for first, last, picture in spans:
        if runs and runs[-1][2] == picture and runs[-1][1] + 1 >= first:
            runs[-1] = (runs[-1][0], max(runs[-1][1], last), picture)
        else:
            runs.append((first, last, picture))
    return runs


def _merge_spans(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for first, last in sorted(spans):
        if merged and merged[-1][1] + 1 >= first:
            merged[-1] = (merged[-1][0], max(last, merged[-1][1]))
        else:
            merged.append((first, last))
    return merged


def _merge_texts(texts: list[dict[str, str]]) -> list[dict[str, str]]:
    """One filter per text run: scenes that only differ elsewhere do not restart the text."""
    merged: list[dict[str, str]] = []
    open_runs: dict[tuple, dict[str, str]] = {}
    for spec in sorted(texts, key=lambda t: int(t["in"])):
        key = tuple(sorted((k, v) for k, v in spec.items() if k not in ("in", "out")))
        run = open_runs.get(key)
        if run is not None and int(run["out"]) + 1 >= int(spec["in"]):
            run["out"] = str(max(int(run["out"]), int(spec["out"])))
            continue
        copy = dict(spec)
        open_runs[key] = copy
        merged.append(copy)
    return merged


#: The melt to run instead of the one on the PATH: a path, or a name looked up on the PATH.
MELT_ENV = "MELTER_MELT"
#: Seconds melt may print nothing while it renders before it is taken for hung.
STALL_ENV = "MELTER_MELT_STALL_SECONDS"
#: Seconds melt may take to exit once it has reported its last frame.
EXIT_ENV = "MELTER_MELT_EXIT_SECONDS"


def melt_binary() -> str:
    chosen = os.environ.get(MELT_ENV, "").strip()
    if chosen:
        path = shutil.which(chosen)
        if path is None:
            raise RenderError(f"{MELT_ENV}={chosen}: no such executable")
        return path
    path = shutil.which("melt") or shutil.which("melt-7")
    if path is None:
        raise RenderError("melt is not installed (Debian package 'melt')")
    return path


@dataclass(frozen=True)
class MeltWatch:
    """How long :func:`run_melt` lets melt go quiet before it kills it.

    ``stall_s``: melt has printed nothing (no progress line, nothing else) and its output
    has not changed for this long while it renders. ``exit_s``: melt has reported its last
    frame (or closed its stderr) and neither exited nor changed its output for this long.
    melt 7.12 can stay forever in its wait loop without rendering anything: its avformat
    consumer marks itself running only after starting its thread, and a thread that gets
    there first finds it not running, closes the output empty and ends. That hang is told
    apart within ``race_s`` and melt is started again (``restarts`` times): waiting
    ``stall_s`` for it would fail a render that a second start completes.
    """

    stall_s: float = 120.0
    exit_s: float = 15.0
    #: How long melt must look as that race leaves it (see :func:`_start_race`) before it is
    #: restarted: long enough for a melt still loading its document to show it is working.
    race_s: float = 2.5
    #: How often a melt that hung so is started again before the render fails.
    restarts: int = 2


def melt_watch(environ: dict[str, str] | None = None) -> MeltWatch:
    """The watch's limits from ``MELTER_MELT_STALL_SECONDS`` and ``MELTER_MELT_EXIT_SECONDS``
    (default: :class:`MeltWatch`'s)."""
    env = os.environ if environ is None else environ
    limits: dict[str, float] = {}
    for name, key in ((STALL_ENV, "stall_s"), (EXIT_ENV, "exit_s")):
        raw = env.get(name, "").strip()
        if not raw:
            continue
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise RenderError(f"{name} must be a number of seconds above 0, not {raw!r}")
        limits[key] = value
    default = MeltWatch()
    return MeltWatch(stall_s=limits.get("stall_s", default.stall_s),
                     exit_s=limits.get("exit_s", default.exit_s))


def melt_environment() -> dict[str, str]:
    env = dict(os.environ)
    # MLT 7.12 loads Qt-based services only with a display name set; offscreen needs none.
    env.setdefault("DISPLAY", ":0")
    env.setdefault("QT_QPA_PLATFORM", "offscreen")
    env.setdefault("LC_ALL", "C.UTF-8")
    # Without this the avformat producer builds three swscale contexts per frame and source.
    env.setdefault("MLT_AVFORMAT_SLICED_PIXFMT_DISABLE", "1")
    return env


#: Seconds between looks at a melt that has not reported a frame yet.
_RACE_LOOK_S = 0.5
#: The share of one CPU under which melt counts as idle: the wait loop of a melt caught in
#: the consumer start race wakes 25 times a second and does next to nothing.
_IDLE_SHARE = 0.05


class _StartRace(Exception):
    """melt hung in MLT's consumer start race (see :class:`MeltWatch`)."""


def run_melt(
    document_path: Path,
    consumer: list[str],
    frames: int,
    progress: Callable[[int, int], None] | None = None,
    extra: list[str] | None = None,
    timeout: float | None = None,
) -> str:
    """Run melt on a document; returns its stderr. Raises :class:`RenderError` on trouble.

    melt is watched (see :class:`MeltWatch`): one that stops responding is killed, with any
    process it started, and reported as a :class:`RenderError` naming the last frame it
    reported. One caught in MLT's consumer start race before its first frame is killed and
    started again with the same arguments (a warning is logged), and the empty output it left
    is removed when it was not there before. ``timeout``: seconds the whole run may take,
    restarts included.
    """
    watch = melt_watch()
    command = [melt_binary(), "-progress2", str(document_path), *(extra or []), *consumer]
    target = next((Path(item.split(":", 1)[1]) for item in consumer
                   if item.startswith("avformat:")), None)
    created = target is not None and not os.path.lexists(target)
    began = time.monotonic()
    runs = watch.restarts + 1
    for run in range(1, runs + 1):
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, env=melt_environment(),
        )
        lines: list[str] = []
        try:
            _follow(process, frames, progress, lines, watch, target, timeout, began)
        except _StartRace:
            _kill(process)
            if created and target is not None:
                _remove_empty(target)
            if run == runs:
                raise RenderError(f"melt hung before its first frame {runs} times "
                                  "(MLT consumer start race)") from None
            log.warning("melt hung before its first frame (MLT consumer start race); "
                        "started it again (restart %d of %d)", run, watch.restarts)
            continue
        except BaseException:
            _kill(process)
            raise
        finally:
            if process.stderr is not None:
                process.stderr.close()
        break
    stderr = "\n".join(lines)
    problems = [line for line in lines if any(p.search(line) for p in _ERRORS)]
    if process.returncode != 0 or problems:
        written = _write_failure(lines, consumer)
        if written:
            raise RenderError(written)
        detail = "; ".join(problems[:3]) or f"exit code {process.returncode}"
        raise RenderError(f"melt failed: {detail}")
    return stderr


def _follow(process: subprocess.Popen[bytes], frames: int,
            progress: Callable[[int, int], None] | None, lines: list[str], watch: MeltWatch,
            target: Path | None, timeout: float | None, began: float) -> None:
    """Read melt's stderr into ``lines`` (reporting progress) until melt has exited; raise
    :class:`RenderError` when it stops responding (see :class:`MeltWatch`) or the run begun
    at ``began`` (monotonic) outlasts ``timeout``, :class:`_StartRace` when it hung in the
    consumer start race."""
    assert process.stderr is not None
    fd = process.stderr.fileno()
    started = began
    last_seen = time.monotonic()
    frame = 0
    last = False
    done = False
    reporting = False
    look = last_seen + _RACE_LOOK_S
    race_since: float | None = None
    race_cpu = 0.0
    output = _signature(target)
    buffer = b""
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            now = time.monotonic()
            limit = watch.exit_s if done or last else watch.stall_s
            if timeout is not None and now - started >= timeout:
                raise RenderError(f"melt took longer than {timeout:g} s "
                                  f"(at frame {frame} of {frames})")
            if now - last_seen >= limit:
                if last:
                    raise RenderError(f"melt did not exit {limit:g} s after its last frame "
                                      f"({frame} of {frames})")
                if done:
                    raise RenderError(f"melt did not exit {limit:g} s after closing its "
                                      f"stderr (at frame {frame} of {frames})")
                raise RenderError(f"melt stopped responding for {limit:g} s at frame {frame} "
                                  f"of {frames}")
            watching = not (reporting or done)
            if watching and target is not None and now >= look:
                look = now + _RACE_LOOK_S
                seen = _start_race(process.pid, target) if process.poll() is None else None
                if seen is None:
                    race_since = None
                elif race_since is None or seen[0] - race_cpu > _IDLE_SHARE * watch.race_s:
                    # Counted from a look that finds melt asleep: a melt loading its document
                    # on a crowded machine is waiting for a CPU, not asleep.
                    race_since, race_cpu = (now, seen[0]) if seen[1] else (None, 0.0)
                elif now - race_since >= watch.race_s:
                    raise _StartRace
            wait = min(1.0, last_seen + limit - now)
            if watching and target is not None:
                wait = min(wait, look - now)
            if timeout is not None:
                wait = min(wait, started + timeout - now)
            if done:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=max(0.0, wait))
                    return
            elif selector.select(max(0.0, wait)):
                chunk = os.read(fd, 65536)
                if not chunk:
                    done = True
                    selector.unregister(fd)
                    chunk = b"\n"
                last_seen = time.monotonic()
                buffer += chunk
                parts = re.split(rb"[\r\n]", buffer)
                buffer = parts.pop()
                for raw in parts:
                    line = raw.decode("utf-8", "replace")
                    match = _PROGRESS.search(line)
                    if match:
                        reporting = True
                        frame = max(frame, int(match.group(1)))
                        last = frame >= frames - 1
                        if progress is not None:
                            progress(int(match.group(1)), frames)
                    elif line.strip():
                        lines.append(line)
                continue
            elif process.poll() is not None:
                return  # melt has exited; a process it started holds its stderr
            changed = _signature(target)
            if changed != output:
                output = changed
                last_seen = time.monotonic()


def _start_race(pid: int, target: Path) -> tuple[float, bool] | None:
    """melt's CPU time (seconds), and whether it is asleep, when it looks as MLT's consumer
    start race leaves it; else ``None``.

    The consumer's thread has ended (melt has one thread left, where a rendering melt always
    has that one too), leaving the output empty (or, for a format that opens no file, absent)
    and no longer open, and the thread left is asleep where melt's wait loop sleeps (when the
    kernel says where) or waiting for a CPU. A melt still loading its document looks the same
    but for its CPU time, and for not sleeping there, which the caller watches.
    """
    try:
        if target.stat().st_size:
            return None
    except FileNotFoundError:
        pass
    except OSError:
        return None
    proc = f"/proc/{pid}"
    try:
        if len(os.listdir(f"{proc}/task")) != 1:
            return None
        with open(f"{proc}/stat", encoding="utf-8", errors="replace") as handle:
            stat = handle.read()
        # pid (comm) state ppid ... utime stime: comm may hold spaces and parentheses.
        fields = stat[stat.rfind(")") + 2:].split()
        if fields[0] not in ("S", "R"):
            return None
        path = os.path.realpath(target)
        for entry in os.listdir(f"{proc}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"{proc}/fd/{entry}") == path:
                    return None
        where = ""
        with contextlib.suppress(OSError), \
                open(f"{proc}/wchan", encoding="utf-8", errors="replace") as handle:
            where = handle.read().strip()
        if where not in ("", "0") and "nanosleep" not in where:
            return None
        return (int(fields[11]) + int(fields[12])) / _clock_ticks(), fields[0] == "S"
    except (OSError, ValueError, IndexError):
        return None


def _clock_ticks() -> int:
    """The unit of the CPU times in ``/proc/<pid>/stat``."""
    try:
        return os.sysconf("SC_CLK_TCK")
    except (ValueError, OSError):
        return 100


def _remove_empty(path: Path) -> None:
    """Remove ``path`` if it is an empty file."""
    with contextlib.suppress(OSError):
        if path.is_file() and path.stat().st_size == 0:
            path.unlink()


def _signature(path: Path | None) -> tuple[int, int] | None:
    """What tells a growing output from one left alone: its size and modification time."""
    if path is None:
        return None
    try:
        status = path.stat()
    except OSError:
        return None
    return status.st_size, status.st_mtime_ns


def _kill(process: subprocess.Popen[bytes]) -> None:
    """Kill melt and every process under it, and reap melt."""
    family = descendants(process.pid) if process.poll() is None else []
    process.kill()
    for pid in family:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    process.wait()


def _write_failure(lines: list[str], consumer: list[str]) -> str | None:
    """Why melt could not write its output, in words, naming where (melt itself only says
    ``error writing video frame: -28``)."""
    target = next((Path(item.split(":", 1)[1]) for item in consumer
                   if item.startswith("avformat:")), None)
    for line in lines:
        match = _WRITE_FAILED.search(line)
        if match is None and "No space left on device" not in line:
            continue
        code = int(match.group(1)) if match else errno.ENOSPC
        where = target.parent if target is not None else "the output"
        if code == errno.ENOSPC:
            return f"no space left on device at {where}"
        return f"cannot write the output in {where}: {os.strerror(code)}"
    return None
