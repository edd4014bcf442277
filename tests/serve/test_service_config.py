"""The service's configuration: the farm's TOML file with a [service] table, under the
environment; rooms mapped to layouts and outputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from melter.errors import MelterError
from melter.serve.config import load_settings
from melter.serve.renders import auto_spec

TOML = """
storage_root = "{root}"
[service]
grace_seconds = 120
[service.default]
layout = "grid"
[service.rooms."2002"]
layout = "speaker"
callback_url = "https://hooks.example.org/melter"
outputs = [
  {{ name = "board/{{room}}-{{start}}.mp4" }},
  {{ name = "board/{{room}}-{{start}}.m4a", preset = "m4a" }},
]
"""


def settings_for(tmp_path: Path, **env: str):  # type: ignore[no-untyped-def]
    file = tmp_path / "farm.toml"
    file.write_text(TOML.format(root=tmp_path))
    return load_settings({"MELTER_CONFIG": str(file), "MELTER_BROKER_URL": "redis://x/0",
                          **env})


def test_rooms_map_to_layouts_and_outputs(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    assert settings.farm.storage_root == tmp_path  # the farm reads the same file
    assert settings.service.grace_seconds == 120
    assert settings.recordings == tmp_path / "recordings"
    assert settings.renders == tmp_path / "renders"
    stamp = 1795700544656027  # 2026-11-26 13:42:24 UTC
    spec = auto_spec(settings, "2002", "2002-1", stamp, [tmp_path / "a.mjr"], "janus")
    assert spec["layout"] == "speaker"
    assert spec["callback_url"] == "https://hooks.example.org/melter"
    assert [o["path"] for o in spec["outputs"]] == [
        str(tmp_path / "renders/board/2002-20261126T134224Z.mp4"),
        str(tmp_path / "renders/board/2002-20261126T134224Z.m4a")]
    assert [o["preset"] for o in spec["outputs"]] == [None, "m4a"]
    assert spec["idempotency_key"] == "auto:janus:2002-1" and spec["room"] == "2002"
    other = auto_spec(settings, "77", "77-1", stamp, [tmp_path / "b.mjr"], "janus")
    assert other["layout"] == "grid" and other["callback_url"] is None
    assert other["outputs"] == [{"path": str(tmp_path / "renders/room-77-20261126T134224Z.mp4"),
                                 "preset": None}]


def test_a_prerendered_meeting_is_cut_in_short_chunks(tmp_path: Path) -> None:
    """With prerenders, an automatic render and the meeting's prerenders are cut alike, in
    the service's chunks (12 s unless set); without them (or for a meeting `melter watch`
    found, never prerendered), the farm's chunks are used."""
    stamp = 1795700544656027

    def chunks(prerendered: bool = True, **env: str) -> float | None:
        spec = auto_spec(settings_for(tmp_path, **env), "77", "77-1", stamp,
                         [tmp_path / "b.mjr"], "janus", prerendered=prerendered)
        return spec.get("chunk_seconds")

    assert chunks() == 12.0
    assert chunks(MELTER_AUTO_CHUNK_SECONDS="18") == 18.0
    assert chunks(MELTER_AUTO_CHUNK_SECONDS="0") is None
    assert chunks(MELTER_PRERENDER_SECONDS="0") is None
    assert chunks(prerendered=False) is None


def test_the_environment_wins(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, MELTER_GRACE_SECONDS="7.5",
                            MELTER_RECORDINGS_DIR="/data/janus", MELTER_DEFAULT_LAYOUT="pip",
                            MELTER_API_TOKEN="t0k")
    assert settings.service.grace_seconds == 7.5
    assert settings.recordings == Path("/data/janus")
    assert settings.service.rule("77").layout == "pip"
    assert settings.service.rule("2002").layout == "speaker"
    assert settings.service.api_token == "t0k"


def test_mistakes_are_named(tmp_path: Path) -> None:
    with pytest.raises(MelterError, match="grace_seconds"):
        settings_for(tmp_path, MELTER_GRACE_SECONDS="soon")
    file = tmp_path / "bad.toml"
    file.write_text('[service]\ngrace_second = 5\n')
    with pytest.raises(MelterError, match="grace_second: Extra inputs"):
        load_settings({"MELTER_CONFIG": str(file)})


def test_secrets_come_from_files(tmp_path: Path) -> None:
    """Docker secrets are files: ``MELTER_API_TOKEN_FILE`` and the like name them."""
    token, password = tmp_path / "api_token", tmp_path / "janus_password"
    token.write_text("from-a-secret\n")
    password.write_text("pw\n")
    settings = settings_for(tmp_path, MELTER_API_TOKEN_FILE=str(token),
                            MELTER_JANUS_USER="janus", MELTER_JANUS_PASSWORD_FILE=str(password))
    assert settings.service.api_token == "from-a-secret"
    assert settings.service.janus_password == "pw"
    with pytest.raises(MelterError, match="set MELTER_API_TOKEN or MELTER_API_TOKEN_FILE"):
        settings_for(tmp_path, MELTER_API_TOKEN="x", MELTER_API_TOKEN_FILE=str(token))
    with pytest.raises(MelterError, match=r"MELTER_API_TOKEN_FILE: .*missing"):
        settings_for(tmp_path, MELTER_API_TOKEN_FILE=str(tmp_path / "missing"))
