"""The layout file: a YAML document validated by pydantic, with a published JSON Schema.

The region model follows Twilio Compositions' (position, size, z-order, auto-grid limits,
excluded cells, overflow policy, source globs) and adds what a recording made after the
meeting allows: rules that change the layout over the meeting's timeline (while a screen share
exists, or between two times, pinning someone), an active-speaker region, name labels and a
placeholder card for participants without video.
"""

from __future__ import annotations

import re
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from melter.errors import InputError, MelterError

# The top-level ``layouts/`` folder, installed as this package (setup.py maps it).
BUILTIN_PACKAGE = "melter.layout.builtin"
_COLOR = re.compile(r"^#(?:[0-9a-fA-F]{6}|[0-9a-fA-F]{8})$")
_LENGTH = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(%|px)?\s*$")
_TIME = re.compile(r"^(?:(\d+):)?(\d{1,2}):(\d{1,2}(?:\.\d+)?)$|^(\d+(?:\.\d+)?)s?$")

Kind = Literal["camera", "screen"]
KINDS: tuple[Kind, ...] = ("camera", "screen")

def check_colour(value: str) -> str:
    if not _COLOR.match(value):
        raise ValueError(f"{value!r} is not a colour (use #RRGGBB or #RRGGBBAA)")
    return value


Colour = Annotated[str, AfterValidator(check_colour)]

Length = Annotated[
    int | float | str,
    Field(description="pixels (a number or '120px') or a percentage of the canvas ('50%')"),
]


def parse_length(value: int | float | str, total: int) -> int:
    """Pixels from a length given in pixels or percent of ``total``."""
    if isinstance(value, (int, float)):
        return round(value)
    match = _LENGTH.match(value)
    if not match:
        raise ValueError(f"{value!r} is not a length (use pixels or a percentage like '50%')")
    number = float(match.group(1))
    return round(number * total / 100) if match.group(2) == "%" else round(number)


def parse_time(value: str | int | float) -> float:
    """Seconds from ``HH:MM:SS(.s)``, ``MM:SS`` or a number of seconds."""
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"{value!r} is negative")
        return float(value)
    match = _TIME.match(value.strip())
    if not match:
        raise ValueError(f"{value!r} is not a time (use HH:MM:SS, MM:SS or seconds)")
    if match.group(4) is not None:
        return float(match.group(4))
    if (int(match.group(2)) >= 60 and match.group(1) is not None) or float(match.group(3)) >= 60:
        raise ValueError(f"{value!r} is not a time (minutes and seconds run to 59)")
    hours = int(match.group(1) or 0)
    return hours * 3600 + int(match.group(2)) * 60 + float(match.group(3))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Canvas(_Strict):
    width: int = Field(1280, ge=16, le=7680, description="pixels")
    height: int = Field(720, ge=16, le=4320, description="pixels")
    fps: int = Field(30, ge=1, le=120, description="frames per second")
    background: Colour = Field("#000000", description="colour as #RRGGBB")
    background_image: str | None = Field(None, description="image file drawn under everything")

    @model_validator(mode="after")
    def _even(self) -> Canvas:
        if self.width % 2 or self.height % 2:
            raise ValueError("width and height must be even (H.264 and VP9 need 4:2:0 chroma)")
        return self


class Region(_Strict):
    name: str = Field(..., min_length=1)
    x: Length = 0
    y: Length = 0
    width: Length = "100%"
    height: Length = "100%"
    z: int = Field(0, description="stacking order: higher is drawn on top")
    max_rows: int | None = Field(None, ge=1, le=16)
    max_columns: int | None = Field(None, ge=1, le=16)
    cells_excluded: list[int] = Field(
        default_factory=list, description="grid cells (0-based, row-major) left empty"
    )
    fit: Literal["crop", "letterbox"] = "crop"
    sources: list[str] = Field(
        default_factory=lambda: ["*"],
        description="globs on participant id or display name",
    )
    sources_excluded: list[str] = Field(default_factory=list)
    kinds: list[Kind] = Field(default_factory=lambda: list(KINDS))
    reuse: Literal["show_oldest", "show_newest"] = Field(
        "show_oldest", description="who is shown when more participants fit than cells"
    )
    role: Literal["grid", "speaker", "others"] = Field(
        "grid",
        description="grid: everyone selected; speaker: the current speaker (or the pinned "
        "participant); others: everyone selected except the speaker",
    )
    padding: int = Field(4, ge=0, le=200, description="pixels between cells")
    show_video: bool = Field(True, description="false: always the placeholder card (audio-only)")

    @field_validator("x", "y")
    @classmethod
    def _position(cls, value: int | float | str) -> int | float | str:
        if parse_length(value, 10_000) < 0:
            raise ValueError(f"{value!r} is negative")
        return value

    @field_validator("width", "height")
    @classmethod
    def _size(cls, value: int | float | str) -> int | float | str:
        if parse_length(value, 10_000) <= 0:
            raise ValueError(f"{value!r} is not a positive size")
        return value


class Labels(_Strict):
    enabled: bool = True
    size: int = Field(20, ge=6, le=200, description="font size in pixels")
    color: Colour = "#ffffff"
    background: Colour = "#00000099"
    font: str = "DejaVu Sans"


class Placeholder(_Strict):
    """The card shown for a participant without video."""

    color: Colour = "#3a3a4a"
    text: Literal["initials", "name", "none"] = "initials"
    text_color: Colour = "#ffffff"


class Speaker(_Strict):
    """How the active speaker is decided from the recorded audio."""

    on_dbov: float = Field(-35.0, le=0, description="louder than this starts speech")
    off_dbov: float = Field(-45.0, le=0, description="quieter than this ends speech")
    hold: float = Field(0.5, ge=0, description="seconds the speaker keeps the floor in silence")
    min_switch: float = Field(1.0, ge=0, description="seconds between two switches at least")
    hysteresis_db: float = Field(
        6.0, ge=0, description="a challenger must be this much louder than a speaking speaker"
    )
    window: float = Field(0.1, gt=0, le=2, description="seconds per level measurement")


class Rule(_Strict):
    """A change of layout over part of the meeting."""

    when: Literal["screen_share", "always"] | None = Field(
        None, description="screen_share: while any screen share is present"
    )
    start: str | float | None = Field(None, alias="from", description="meeting time it starts")
    end: str | float | None = Field(None, alias="to", description="meeting time it ends")
    layout: str | None = Field(None, description="built-in or file layout whose regions apply")
    regions: list[Region] | None = Field(None, description="regions that apply instead")
    pin: str | None = Field(None, description="glob: this participant takes the speaker role")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("start", "end")
    @classmethod
    def _time(cls, value: str | float | None) -> str | float | None:
        if value is not None:
            parse_time(value)
        return value

    @model_validator(mode="after")
    def _effect(self) -> Rule:
        if self.layout is None and self.regions is None and self.pin is None:
            raise ValueError("a rule needs layout, regions or pin")
        if self.when is None and self.start is None and self.end is None:
            raise ValueError("a rule needs when, from or to")
        if self.start is not None and self.end is not None and \
                parse_time(self.start) >= parse_time(self.end):
            raise ValueError(f"from ({self.start}) must come before to ({self.end})")
        return self


class Layout(_Strict):
    name: str = "custom"
    description: str = ""
    canvas: Canvas = Field(default_factory=lambda: Canvas())
    regions: list[Region] = Field(..., min_length=1)
    labels: Labels = Field(default_factory=lambda: Labels())
    placeholder: Placeholder = Field(default_factory=lambda: Placeholder())
    speaker: Speaker = Field(default_factory=lambda: Speaker())
    rules: list[Rule] = Field(default_factory=list)
    audio_sources: list[str] = Field(default_factory=lambda: ["*"])

    @model_validator(mode="after")
    def _unique(self) -> Layout:
        names = [r.name for r in self.regions]
        if len(names) != len(set(names)):
            raise ValueError(f"region names must be unique (got {names})")
        return self

    @model_validator(mode="after")
    def _inside_canvas(self) -> Layout:
        """Every region lies on the canvas: a tile beyond it shows nothing, or a cut picture,
        and was never what the author meant."""
        width, height = self.canvas.width, self.canvas.height
        inline = [region for rule in self.rules for region in rule.regions or []]
        for region in [*self.regions, *inline]:
            x, y = parse_length(region.x, width), parse_length(region.y, height)
            right = x + parse_length(region.width, width)
            bottom = y + parse_length(region.height, height)
            # One pixel of slack: percentages are rounded one by one.
            if right > width + 1 or bottom > height + 1:
                raise ValueError(
                    f"region {region.name!r} reaches {right}x{bottom}, beyond the "
                    f"{width}x{height} canvas")
        return self


def _message(source: str, exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "(top level)"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


def builtin_dir() -> Traversable:
    """The built-in layouts as package data, so they are found wherever Melter is installed
    (wheel, sdist build or editable checkout), never by a path relative to the source tree."""
    try:
        return resources.files(BUILTIN_PACKAGE)
    except ModuleNotFoundError:
        raise MelterError(f"no built-in layouts: the package {BUILTIN_PACKAGE} is not "
                          "installed (reinstall melter)") from None


def builtin_names() -> list[str]:
    """The names of the built-in layouts; none at all is a broken install, not an empty
    list (a command listing nothing and succeeding would hide it)."""
    folder = builtin_dir()
    names = sorted(p.name.removesuffix(".yaml") for p in folder.iterdir()
                   if p.name.endswith(".yaml") and p.is_file())
    if not names:
        raise MelterError(f"no built-in layouts in {folder} (package {BUILTIN_PACKAGE}); "
                          "reinstall melter")
    return names


def _builtin(name: str) -> Traversable | None:
    """A built-in layout by bare name; a name with a path separator is a file, never a
    built-in."""
    if "/" in name or "\\" in name:
        return None
    candidate = builtin_dir() / f"{name}.yaml"
    return candidate if candidate.is_file() else None


def load_layout(name_or_path: str | Path) -> Layout:
    """A built-in layout by name, or a layout file."""
    path = Path(name_or_path)
    source: Path | Traversable = path
    if not path.suffix and not path.exists():
        found = _builtin(str(name_or_path))
        if found is None:
            raise InputError(
                path,
                f"no such layout (built-ins: {', '.join(builtin_names())}; or give a YAML file)",
            )
        source = found
    try:
        data = yaml.safe_load(source.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(path, exc.strerror or str(exc)) from None
    except yaml.YAMLError as exc:
        raise InputError(str(source), f"not valid YAML ({exc})") from None
    layout = parse_layout(data, str(source))
    for number, rule in enumerate(layout.rules):
        if rule.layout is not None:
            target = Path(rule.layout)
            found_rule = _builtin(rule.layout) is not None or target.exists() or (
                path.parent / target).exists()
            if not found_rule:
                raise InputError(
                    str(source), f"rules.{number}.layout: no layout named {rule.layout!r} "
                    f"(built-ins: {', '.join(builtin_names())})"
                )
    return layout


def parse_layout(data: object, source: str = "layout") -> Layout:
    try:
        return Layout.model_validate(data)
    except ValidationError as exc:
        raise InputError(source, _message(source, exc)) from None


def schema() -> dict:
    return Layout.model_json_schema()
