"""Secrets from files (Docker secrets) and the worker's broker-free health check."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from melter.errors import MelterError
from melter.farm.config import load_config, with_password
from melter.farm.health import check
from tests.helpers.farm import ROOT, FarmHarness, test_redis_url


def _empty(folder: Path) -> Path:
    """An empty configuration file: the test sees only the environment it passes."""
    path = folder / "farm.toml"
    path.write_text("")
    return path


def test_a_value_can_come_from_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "flower_password"
    secret.write_text("s3cret with spaces\n")
    config = load_config({"MELTER_FLOWER_PASSWORD_FILE": str(secret)}, path=_empty(tmp_path))
    assert config.flower_password == "s3cret with spaces"


def test_the_redis_password_goes_into_the_broker_url(tmp_path: Path) -> None:
    secret = tmp_path / "redis_password"
    secret.write_text("p@ss/word:1\n")
    config = load_config({"MELTER_BROKER_URL": "redis://redis:6379/0",
                          "MELTER_REDIS_PASSWORD_FILE": str(secret)}, path=_empty(tmp_path))
    assert config.broker_url == "redis://:p%40ss%2Fword%3A1@redis:6379/0"
    import redis

    parsed = redis.connection.parse_url(config.broker_url)
    assert parsed["password"] == "p@ss/word:1"
    assert parsed["host"] == "redis" and parsed["port"] == 6379 and parsed["db"] == 0
    # A URL that carries its own password keeps it.
    assert with_password("redis://:own@r:1/2", "other") == "redis://:own@r:1/2"
    assert with_password("redis://user@r:1/2", "pw") == "redis://user:pw@r:1/2"


def test_value_and_file_together_are_refused(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("x")
    with pytest.raises(MelterError, match="MELTER_FLOWER_PASSWORD or "
                       "MELTER_FLOWER_PASSWORD_FILE, not both"):
        load_config({"MELTER_FLOWER_PASSWORD": "y", "MELTER_FLOWER_PASSWORD_FILE": str(secret)},
                    path=_empty(tmp_path))


def test_a_missing_secret_file_is_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT),
           "MELTER_REDIS_PASSWORD_FILE": str(tmp_path / "absent"),
           "MELTER_BROKER_URL": "redis://127.0.0.1:1/0"}
    env.pop("MELTER_CONFIG", None)
    run = subprocess.run([sys.executable, "-c", "from melter.cli import main; main()", "jobs"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert run.stderr.strip().count("\n") == 0, run.stderr
    assert "MELTER_REDIS_PASSWORD_FILE" in run.stderr and "No such file" in run.stderr
    assert "Traceback" not in run.stderr


def _healthcheck(env: dict[str, str], *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "melter.farm", "healthcheck", *extra],
                          env=env, capture_output=True, text=True, timeout=60)


def test_the_worker_keeps_its_health_file_fresh_and_the_check_sees_it_stop(
        tmp_path: Path) -> None:
    health = tmp_path / "run" / "health"
    farm = FarmHarness(tmp_path, test_redis_url(), settings={
        "MELTER_HEALTH_FILE": str(health), "MELTER_HEALTH_INTERVAL": "0.5"})
    try:
        missing = _healthcheck(farm.env)
        assert missing.returncode == 1 and "does not exist" in missing.stderr
        worker = farm.start_worker("health")
        # Fresh for several intervals in a row while the worker idles.
        ages = []
        for _ in range(6):
            time.sleep(0.5)
            ages.append(time.time() - health.stat().st_mtime)
            result = _healthcheck(farm.env)
            assert result.returncode == 0, result.stderr
        assert max(ages) < 1.5, ages
        # Stop the event loop (SIGSTOP: the process is there but does nothing): stale.
        os.killpg(worker.pid, 19)
        try:
            time.sleep(2.0)
            stale = _healthcheck(farm.env)
            assert stale.returncode == 1
            assert "last touched" in stale.stderr and "limit 1.5 s" in stale.stderr
            assert "Traceback" not in stale.stderr
        finally:
            os.killpg(worker.pid, 18)
        time.sleep(1.0)
        assert _healthcheck(farm.env).returncode == 0
    finally:
        farm.cleanup()


def test_check_compares_the_age_with_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "health"
    path.write_text("")
    os.utime(path, (time.time() - 20, time.time() - 20))
    assert 19 < check(path, 30) < 22
    with pytest.raises(MelterError, match="limit 10 s"):
        check(path, 10)
