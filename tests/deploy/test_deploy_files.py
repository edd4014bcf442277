"""The deployment files: compose-spec schema validation, and the facts the farm relies on.

``stack.yml``, ``stack.local.yml`` and ``compose/compose.yml`` are validated with
check-jsonschema's vendored compose-spec schema; then the numbers that keep renders alive are
asserted (grace period against the farm's time limits, slots, stop-first updates, DNS round
robin on the macvlan network, read-only recordings, secrets as files). The real deployment is
``tests/swarm/test_deploy_swarm.py``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from melter.errors import MelterError
from melter.farm.config import load_config
from melter.swarm.apply import config_differences, engine_urls
from melter.swarm.placement import Inventory, plan

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILES = [ROOT / "stack.yml", ROOT / "stack.local.yml", ROOT / "compose" / "compose.yml"]


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())  # type: ignore[no-any-return]


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema",
                           "vendor.compose-spec", str(path)],
                          capture_output=True, text=True, timeout=120)


def seconds(duration: str) -> float:
    """A Compose duration (``6h10m``, ``30s``, ``1m30s``) in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def default_of(value: str) -> str:
    """The default of a ``${NAME:-default}`` substitution."""
    found = re.fullmatch(r"\$\{[A-Z_]+:-([^}]*)\}", value)
    assert found, value
    return found.group(1)


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_file_passes_the_compose_spec_schema(path: Path) -> None:
    result = validate(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok -- validation done" in result.stdout


def test_the_schema_check_catches_a_broken_file(tmp_path: Path) -> None:
    stack = load(ROOT / "stack.yml")
    stack["services"]["worker"]["deploy"]["update_config"]["order"] = ["stop-first"]
    stack["services"]["worker"]["stop_grace_priod"] = "1h"
    broken = tmp_path / "broken.yml"
    broken.write_text(yaml.safe_dump(stack))
    result = validate(broken)
    assert result.returncode == 1
    assert "stop_grace_priod" in result.stdout and "order" in result.stdout


def test_the_worker_service_outlasts_a_long_render_and_updates_stop_first(
        tmp_path: Path) -> None:
    stack = load(ROOT / "stack.yml")
    worker = stack["services"]["worker"]
    env = {k: str(v) for k, v in worker["environment"].items()}
    soft, hard = float(env["MELTER_SOFT_TIME_LIMIT"]), float(env["MELTER_HARD_TIME_LIMIT"])
    assert (soft, hard) == (21600, 21900)
    grace = seconds(worker["stop_grace_period"])
    assert grace == 22200 and grace > hard > soft
    # The stack's timing values are a configuration the farm accepts.
    for secret in ("MELTER_REDIS_PASSWORD_FILE", "MELTER_CALLBACK_SECRET_FILE"):
        assert env.pop(secret).startswith("/run/secrets/")  # a path inside the container
    config = load_config({**env, "MELTER_REDIS_PASSWORD": "x"}, path=_empty_config(tmp_path))
    assert config.broker_url == "redis://:x@redis:6379/0"
    assert config.visibility_timeout > config.hard_time_limit
    deploy = worker["deploy"]
    assert deploy["update_config"]["order"] == "stop-first"
    assert deploy["update_config"]["parallelism"] == 1
    assert deploy["rollback_config"]["order"] == "stop-first"
    assert deploy["restart_policy"]["condition"] == "any"
    assert seconds(deploy["restart_policy"]["delay"]) == 30
    assert int(default_of(deploy["placement"]["max_replicas_per_node"])) == 4
    assert int(default_of(deploy["replicas"])) == 4
    assert float(deploy["resources"]["reservations"]["cpus"]) == 1.0
    assert deploy["resources"]["reservations"]["memory"] == "1G"
    assert deploy["resources"]["limits"]["memory"] == "4G"


def _empty_config(folder: Path) -> Path:
    path = folder / "farm.toml"
    path.write_text("")
    return path


def test_every_service_uses_dns_round_robin_and_workers_sit_on_the_macvlan_network() -> None:
    stack = load(ROOT / "stack.yml")
    for name, service in stack["services"].items():
        assert service["deploy"]["endpoint_mode"] == "dnsrr", name
        for port in service.get("ports", []):
            assert port["mode"] == "host", name  # no routing mesh (it needs virtual IPs)
    worker = stack["services"]["worker"]
    assert worker["networks"] == ["meltnet", "farm"]
    assert stack["networks"]["meltnet"]["external"] is True
    assert default_of(stack["networks"]["meltnet"]["name"]) == "meltnet"
    assert stack["networks"]["farm"]["driver"] == "overlay"
    assert stack["services"]["redis"]["networks"] == ["farm"]
    assert "{{.Task.Slot}}" in worker["hostname"]


def test_recordings_are_read_only_renders_writable_and_both_on_nfs() -> None:
    stack = load(ROOT / "stack.yml")
    mounts = {m["source"]: m for m in stack["services"]["worker"]["volumes"]}
    assert mounts["recordings"]["read_only"] is True
    assert mounts["recordings"]["target"] == "/srv/melter/recordings"
    assert not mounts["renders"].get("read_only", False)
    assert stack["services"]["worker"]["environment"]["MELTER_OUTPUT_ROOT"] == \
        mounts["renders"]["target"]
    volumes = stack["volumes"]
    for name, access in (("recordings", "ro"), ("renders", "rw")):
        options = volumes[name]["driver_opts"]
        assert options["type"] == "nfs"
        assert access in options["o"].split(",") and "hard" in options["o"].split(",")
        assert re.search(r"-v\d+$", volumes[name]["name"])  # versioned: options are not
        # re-applied to an existing volume
    local = load(ROOT / "stack.local.yml")["volumes"]
    assert {v["driver_opts"]["o"] for v in local.values()} == {"bind"}
    assert volumes["recordings"]["name"] != local["recordings"]["name"]


def test_passwords_are_secrets_never_values() -> None:
    stack = load(ROOT / "stack.yml")
    assert all(s == {"external": True} for s in stack["secrets"].values())
    assert set(stack["secrets"]) == {"melter_redis_password", "melter_flower_password",
                                     "melter_api_token", "melter_callback_secret",
                                     "melter_janus_password"}
    for name, service in stack["services"].items():
        for key in service.get("environment", {}):
            if any(word in key for word in ("PASSWORD", "TOKEN")):
                assert key.endswith("_FILE"), (name, key)
    redis = stack["services"]["redis"]
    assert redis["secrets"] == [{"source": "melter_redis_password", "target": "redis_password"}]
    assert redis["volumes"] == ["redis-data:/data"]
    assert redis["deploy"]["placement"]["constraints"] == ["node.labels.melter.redis == true"]
    flower = stack["services"]["flower"]
    assert flower["environment"]["MELTER_FLOWER_PASSWORD_FILE"] == \
        "/run/secrets/melter_flower_password"
    assert "/healthz" in " ".join(stack["services"]["api"]["healthcheck"]["test"])
    # melter serve listens beyond loopback: it refuses to start without Janus's credentials
    for file in (stack, load(ROOT / "compose" / "compose.yml")):
        api = file["services"]["api"]
        assert "0.0.0.0" in api["command"]
        assert api["environment"]["MELTER_JANUS_USER"] == "janus"
        assert api["environment"]["MELTER_JANUS_PASSWORD_FILE"] == \
            "/run/secrets/melter_janus_password"
        assert "melter_janus_password" in api["secrets"]


def test_redis_keeps_what_it_is_given() -> None:
    entry = (ROOT / "workers" / "redis" / "entrypoint.sh").read_text()
    for line in ("appendonly yes", "appendfsync everysec", "maxmemory-policy noeviction"):
        assert f'echo "{line}"' in entry
    assert "requirepass" in entry and "--requirepass" not in entry


def test_the_worker_image_runs_unprivileged_with_a_cheap_healthcheck() -> None:
    dockerfile = (ROOT / "workers" / "Dockerfile").read_text()
    assert re.search(r"^USER melter$", dockerfile, re.M)
    assert "useradd --system --uid 10001" in dockerfile
    health = re.search(r"^HEALTHCHECK (.*?)\n\s+CMD (.*)$", dockerfile, re.M)
    assert health and health.group(2) == '["melter", "healthcheck"]'
    assert "--interval=15s" in health.group(1)
    assert re.search(r"^ENTRYPOINT \[\"tini\", \"--\", \"melter-entrypoint\"\]$", dockerfile,
                     re.M)
    for package in ("melt", "ffmpeg", "fonts-dejavu-core", "python3"):
        assert re.search(rf"\s{re.escape(package)}(\s|$)", dockerfile), package
    for script in ("workers/entrypoint.sh", "workers/redis/entrypoint.sh"):
        assert subprocess.run(["sh", "-n", str(ROOT / script)]).returncode == 0, script
    for script in ("workers/build-base", "workers/build-image", "compose/up",
                   "scripts/test-deploy"):
        assert subprocess.run(["bash", "-n", str(ROOT / script)]).returncode == 0, script
        assert os.access(ROOT / script, os.X_OK), script


def test_the_dev_stack_mounts_a_local_folder_read_only_and_keeps_redis_data() -> None:
    compose = load(ROOT / "compose" / "compose.yml")
    worker = compose["services"]["worker"]
    assert "${MELTER_DEV_DATA:-./data}/recordings:/srv/melter/recordings:ro" in worker["volumes"]
    assert "${MELTER_DEV_DATA:-./data}/renders:/srv/melter/renders" in worker["volumes"]
    assert worker["scale"] == 2
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert compose["services"]["redis"]["volumes"] == ["redis-data:/data"]
    assert all("file" in s for s in compose["secrets"].values())
    assert compose["services"]["flower"]["ports"] == [
        "127.0.0.1:${MELTER_DEV_FLOWER_PORT:-5555}:5555"]


def _image_uids() -> dict[str, int]:
    """The uid each image of the development stack runs as, from its Dockerfile."""
    uids = {}
    for image, dockerfile in (("melter:latest", "workers/Dockerfile"),
                              ("melter-redis:latest", "workers/redis/Dockerfile")):
        text = (ROOT / dockerfile).read_text()
        user = re.search(r"^USER (\S+)$", text, re.M)
        assert user, dockerfile
        uid = re.search(rf"useradd --system --uid (\d+) .*?{user.group(1)}\s", text, re.S)
        assert uid, dockerfile
        uids[image] = int(uid.group(1))
    return uids


@pytest.mark.skipif(os.geteuid() != 0, reason="compose/up gives the secret files to the "
                    "containers' users: as root here (else through a container of the image)")
def test_compose_up_gives_each_secret_0600_to_the_user_that_reads_it(tmp_path: Path) -> None:
    data, secrets = tmp_path / "data", tmp_path / "secrets"
    # as an earlier compose/up left them: secrets 0644, renders 0777
    (data / "renders").mkdir(parents=True)
    (data / "renders").chmod(0o777)
    secrets.mkdir()
    (secrets / "redis_password").write_text("old-redis-pw\n")
    (secrets / "redis_password").chmod(0o644)
    env = {**os.environ, "MELTER_DEV_DATA": str(data), "MELTER_DEV_SECRETS": str(secrets)}
    runs = [subprocess.run([str(ROOT / "compose" / "up"), "--files-only"], env=env,
                           capture_output=True, text=True, timeout=60) for _ in range(2)]
    for result in runs:
        assert result.returncode == 0, result.stderr
        assert "nothing started" in result.stderr
    compose = load(ROOT / "compose" / "compose.yml")
    uids = _image_uids()
    assert uids == {"melter:latest": 10001, "melter-redis:latest": 10002}
    files = {}
    for name, secret in compose["secrets"].items():
        found = re.fullmatch(r"\$\{MELTER_DEV_SECRETS:-\./secrets\}/([\w.]+)", secret["file"])
        assert found, secret
        files[name] = secrets / found.group(1)
    readers: dict[str, set[int]] = {}
    for service in compose["services"].values():
        for secret in service.get("secrets", []):
            readers.setdefault(secret, set()).add(uids[service["image"]])
    assert set(readers) == set(files)
    modes = {}
    for name, path in files.items():
        info = path.stat()
        modes[path.name] = (oct(info.st_mode & 0o777), info.st_uid, info.st_gid)
        assert readers[name] == {info.st_uid}, (name, readers[name], info.st_uid)
        assert info.st_mode & 0o777 == 0o600, (name, oct(info.st_mode))
    redis_copy = secrets / "redis_password.redis"
    assert redis_copy.read_text() == (secrets / "redis_password").read_text() == \
        "old-redis-pw\n"
    handler = secrets / "janus.eventhandler.sampleevh.jcfg"
    assert handler.stat().st_mode & 0o777 == 0o600 and handler.stat().st_uid == os.getuid()
    password = (secrets / "janus_password").read_text().strip()
    assert f'backend_pwd = "{password}"' in handler.read_text()
    assert secrets.stat().st_mode & 0o777 == 0o700
    assert not [p for p in secrets.iterdir() if p.stat().st_mode & 0o077]
    renders, recordings = (data / "renders").stat(), (data / "recordings").stat()
    print(f"secret files (mode, uid, gid): {modes}; renders "
          f"{oct(renders.st_mode & 0o777)} uid {renders.st_uid}; recordings "
          f"{oct(recordings.st_mode & 0o777)}")
    assert renders.st_mode & 0o777 == 0o750
    assert renders.st_uid == uids["melter:latest"] and renders.st_gid == os.getgid()
    assert recordings.st_mode & 0o777 == 0o755  # mounted read-only; the workers read it
    assert not (data.stat().st_mode | recordings.st_mode) & 0o002


# -- melter swarm apply without an engine ------------------------------------------------------
def _inventory(nodes: int = 1) -> Inventory:
    return Inventory.model_validate({
        "subnet": "198.18.0.0/24", "gateway": "198.18.0.1", "network": "meltnet",
        "nodes": [{"name": f"render-{i}", "parent": "eth0", "slots": 3} for i in range(nodes)]})


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("DOCKER_HOST", None)
    return subprocess.run([sys.executable, "-c", "from melter.cli import main; main()", *args],
                          capture_output=True, text=True, env=env, timeout=120)


def test_an_unreachable_engine_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump(_inventory(2).model_dump(mode="json")))
    for url, reason in (("unix:///nonexistent/docker.sock", "no such socket"),
                        ("tcp://127.0.0.1:1", "connection refused")):
        result = _cli("swarm", "apply", str(path), "--node-url", f"render-0={url}",
                      "--node-url", "render-1=unix:///nonexistent/other.sock")
        assert result.returncode == 1
        assert result.stderr == (f"melter: error: node render-0: cannot reach the Docker "
                                 f"engine at {url} ({reason})\n")
    missing = _cli("swarm", "apply", str(path), "--node-url", "render-0=tcp://127.0.0.1:1")
    assert missing.returncode == 1
    assert "no engine URL for node(s) render-1" in missing.stderr
    bad = _cli("swarm", "apply", str(path), "--node-url", "render-9=tcp://127.0.0.1:1",
               "--node-url", "render-1=tcp://127.0.0.1:1")
    assert bad.returncode == 1 and "no node 'render-9' in the inventory" in bad.stderr


def test_engine_urls_default_to_the_local_engine_for_one_node(
        monkeypatch: pytest.MonkeyPatch) -> None:
    one = plan(_inventory(1))
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    assert engine_urls(one, []) == {"render-0": "unix:///var/run/docker.sock"}
    monkeypatch.setenv("DOCKER_HOST", "unix:///run/other.sock")
    assert engine_urls(one, []) == {"render-0": "unix:///run/other.sock"}
    with pytest.raises(MelterError, match="render-0, render-1"):
        engine_urls(plan(_inventory(2)), [])


def test_an_existing_network_is_compared_field_by_field() -> None:
    result = plan(_inventory(1))
    block = result.blocks[0]
    # As `docker network inspect` reports a --config-only network.
    existing = {"Name": "meltnet-config", "ConfigOnly": True, "Driver": "null",
                "Options": {"parent": "eth0"},
                "IPAM": {"Driver": "default", "Config": [{
                    "Subnet": "198.18.0.0/24", "IPRange": str(block.ip_range),
                    "Gateway": "198.18.0.1",
                    "AuxiliaryAddresses": {"other-name": str(block.aux[0])}}]}}
    assert config_differences(existing, result, block) == []
    moved = dict(existing, IPAM={"Config": [dict(existing["IPAM"]["Config"][0],
                                                 IPRange="198.18.0.8/30")]})
    assert config_differences(moved, result, block) == [
        f"ip-range 198.18.0.8/30 (plan: {block.ip_range})",
    ]
    assert ipaddress.ip_network(block.ip_range).num_addresses == 4
    other_parent = dict(existing, Options={"parent": "eth1"})
    assert config_differences(other_parent, result, block) == ["parent eth1 (plan: eth0)"]


# -- docker/cli's own (stricter) schema, offline ------------------------------------------------
def _stack_config(*files: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    args = ["docker", "stack", "config"]
    for path in files:
        args += ["-c", str(path)]
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MELTER_", "NFS_"))}
    clean.pop("DOCKER_HOST", None)
    return subprocess.run(args, capture_output=True, text=True, timeout=60,
                          env={**clean, **env})


def _has_stack_config() -> bool:
    try:
        return subprocess.run(["docker", "stack", "config", "--help"], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _has_stack_config(), reason="no docker CLI with `docker stack config` "
                    "(docker/cli >= 25)")
def test_docker_stack_config_accepts_the_stack_and_interpolates_numbers(tmp_path: Path) -> None:
    result = _stack_config(ROOT / "stack.yml", env={"NFS_SERVER": "192.0.2.10",
                                                    "MELTER_SLOTS": "6"})
    assert result.returncode == 0, result.stderr
    final = yaml.safe_load(result.stdout)
    worker = final["services"]["worker"]
    assert worker["deploy"]["placement"]["max_replicas_per_node"] == 6
    assert worker["deploy"]["replicas"] == 4
    assert final["volumes"]["recordings"]["driver_opts"]["o"] == \
        "addr=192.0.2.10,nfsvers=4.1,ro,hard,noatime"
    assert [v["read_only"] for v in worker["volumes"]
            if v["source"] == "recordings"] == [True]
    local = _stack_config(ROOT / "stack.yml", ROOT / "stack.local.yml", env={
        "NFS_SERVER": "unused", "MELTER_RECORDINGS_DIR": str(tmp_path / "rec"),
        "MELTER_RENDERS_DIR": str(tmp_path / "out")})
    assert local.returncode == 0, local.stderr
    volumes = yaml.safe_load(local.stdout)["volumes"]
    assert volumes["recordings"]["driver_opts"] == {
        "type": "none", "o": "bind", "device": str(tmp_path / "rec")}
    missing = _stack_config(ROOT / "stack.yml", env={})
    assert missing.returncode != 0 and "set NFS_SERVER" in missing.stderr
