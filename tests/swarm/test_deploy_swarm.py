"""The production stack on a real single-node Docker Swarm.

Skipped unless ``MELTER_DOCKER_TESTS=1`` (``scripts/test-deploy`` sets it): it needs root, a
Docker engine of its own (Debian's ``docker.io``), ``debootstrap`` and a few minutes. The test
starts ``dockerd`` on its own socket and folders, builds the images (``workers/build-image``),
starts the development stack with ``compose/up`` and renders once on it, then initialises a
swarm, makes a veth pair as the macvlan parent, creates the network with
``melter swarm apply`` from an inventory of one node with 3 slots, deploys ``stack.yml`` with
local folders instead of NFS, renders a real recording and measures the output. Then it scales
the workers to 5: the two tasks beyond the node's address block fail with "no available IPv4
addresses" while the three others finish their renders. Every address involved lies in
198.18.0.0/15 on this machine. Everything is removed afterwards, also on failure; the engine's
data folder (images, build cache) is kept in ``MELTER_CACHE`` for the next run.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "dev-three-party-vp8"
ENABLED = os.environ.get("MELTER_DOCKER_TESTS") == "1"
CACHE = Path(os.environ.get("MELTER_CACHE", "/var/cache/melter-test"))
SOCKET = "/run/melter-test-docker.sock"
DOCKER_HOST = f"unix://{SOCKET}"
EXEC_ROOT = Path("/run/melter-test-docker")
PIDFILE = Path("/run/melter-test-docker.pid")
STACK = "melter-test"
NETWORK = "melter-test-net"
PARENT, PEER = "mlt-par0", "mlt-peer0"
SLOTS, SCALED = 3, 5
SUBNET = ipaddress.ip_network("198.18.0.0/24")
GATEWAY = ipaddress.ip_address("198.18.0.1")
SECRETS = ("melter_redis_password", "melter_flower_password", "melter_api_token",
           "melter_callback_secret", "melter_janus_password")
#: The stack's volumes: removed before and after, since Docker keeps a volume's options (here
#: the bind folders, new each run) from when it was first made.
VOLUMES = ("melter-recordings-local-v1", "melter-renders-local-v1", f"{STACK}_redis-data")
#: Colours of X, Y and Z in the fixture (RGB), all on screen at 12.5 s, between the white
#: sync flashes (every 5 s of each participant's own clock).
COLOURS = {"X": (20, 160, 160), "Y": (180, 40, 160), "Z": (220, 200, 40)}
LOCAL_DURATION = 23.96  # `melter render` of the fixture, grid layout, on this machine

pytestmark = [
    pytest.mark.skipif(not ENABLED, reason="real Docker deployment: set MELTER_DOCKER_TESTS=1 "
                       "(scripts/test-deploy does, as root, with docker.io and debootstrap)"),
    pytest.mark.timeout(1800),
]


def run(*command: str, check: bool = True, timeout: float = 600,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "DOCKER_HOST": DOCKER_HOST, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {result.returncode}:\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def docker(*args: str, check: bool = True, timeout: float = 600,
           env: dict[str, str] | None = None) -> str:
    return run("docker", *args, check=check, timeout=timeout, env=env).stdout.strip()


def melter(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {"PYTHONPATH": str(ROOT)}
    return run(sys.executable, "-c", "from melter.cli import main; main()", *args, check=check,
               env=env)


def wait_for(what: str, probe: Any, timeout: float, every: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


# -- the engine -------------------------------------------------------------------------------
def _stopped(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state == "Z"  # a zombie has stopped; its parent reaps it


def _stop_engine(engine: subprocess.Popen[bytes] | None = None) -> None:
    try:
        pid = int(PIDFILE.read_text().strip())
    except (OSError, ValueError):
        pid = engine.pid if engine is not None else 0
    if pid <= 0:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not _stopped(pid):
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if engine is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            engine.wait(timeout=30)
    with contextlib.suppress(OSError):
        PIDFILE.unlink()


def _start_engine(log: Path) -> subprocess.Popen[bytes]:
    _stop_engine()  # a previous run's engine, if it was killed before its cleanup
    data = CACHE / "engine" / "data"
    data.mkdir(parents=True, exist_ok=True)
    EXEC_ROOT.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as handle:
        engine = subprocess.Popen(
            ["dockerd", "--data-root", str(data), "--exec-root", str(EXEC_ROOT),
             "-H", DOCKER_HOST, "--pidfile", str(PIDFILE), "--bridge", "none",
             "--default-address-pool", "base=198.18.128.0/17,size=24"],
            stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for("dockerd", lambda: run("docker", "info", check=False).returncode == 0, 60, 0.5)
    return engine


def _veth() -> None:
    run("ip", "link", "del", PARENT, check=False)
    run("ip", "link", "add", PARENT, "type", "veth", "peer", "name", PEER)
    run("ip", "link", "set", PARENT, "up")
    run("ip", "link", "set", PEER, "up")


@dataclass
class Swarm:
    base: Path
    recordings: Path
    renders: Path
    inventory: Path
    env: dict[str, str]
    timings: dict[str, float]
    passwords: dict[str, str]

    def tasks(self, service: str) -> list[dict[str, str]]:
        lines = docker("service", "ps", "--no-trunc", f"{STACK}_{service}", "--format",
                       "{{json .}}").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def containers(self, service: str) -> list[str]:
        return docker("ps", "-q", "--filter", f"label=com.docker.swarm.service.name="
                      f"{STACK}_{service}").split()

    def healthy_workers(self) -> list[str]:
        names = docker("ps", "--filter", f"label=com.docker.swarm.service.name={STACK}_worker",
                       "--filter", "health=healthy", "-q").split()
        return names

    def in_worker(self, *command: str, check: bool = True) -> str:
        container = self.healthy_workers()[0]
        return docker("exec", container, *command, check=check, timeout=300)


def _remove_volumes() -> None:
    with contextlib.suppress(AssertionError):
        wait_for("the stack's volumes to be released", lambda: run(
            "docker", "volume", "rm", "--force", *VOLUMES, check=False).returncode == 0, 30)


def _remove_stack(timings: dict[str, float]) -> None:
    started = time.monotonic()
    run("docker", "stack", "rm", STACK, check=False)
    with contextlib.suppress(AssertionError):
        wait_for("the stack's containers to stop",
                 lambda: not docker("ps", "-q", "--filter",
                                    f"label=com.docker.stack.namespace={STACK}",
                                    check=False), 90)
    timings["cleanup_stack"] = time.monotonic() - started
    for secret in SECRETS:
        run("docker", "secret", "rm", secret, check=False)
    _remove_volumes()
    run("docker", "network", "rm", NETWORK, check=False)
    with contextlib.suppress(AssertionError):
        wait_for("the config-only network to be released", lambda: run(
            "docker", "network", "rm", f"{NETWORK}-config", check=False).returncode == 0
            or not docker("network", "ls", "-q", "--filter", f"name={NETWORK}-config"),
            30)
    run("docker", "swarm", "leave", "--force", check=False)
    run("ip", "link", "del", PARENT, check=False)
    timings["cleanup_swarm"] = time.monotonic() - started


@dataclass
class Engine:
    base: Path
    timings: dict[str, float]


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """This test's own dockerd, with the farm's images built (or found in the cache)."""
    if os.geteuid() != 0:
        pytest.skip("the deployment test needs root (dockerd, veth)")
    for tool in ("dockerd", "docker", "debootstrap", "ip"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not found (apt-get install docker.io debootstrap iproute2)")
    base = tmp_path_factory.mktemp("deploy")
    timings: dict[str, float] = {}
    process = None
    try:
        started = time.monotonic()
        process = _start_engine(base / "dockerd.log")
        timings["engine"] = time.monotonic() - started
        run("docker", "swarm", "leave", "--force", check=False)
        _remove_volumes()
        started = time.monotonic()
        run(str(ROOT / "workers" / "build-image"), timeout=1500)
        timings["images"] = time.monotonic() - started
        yield Engine(base, timings)
    finally:
        started = time.monotonic()
        _stop_engine(process)
        timings["cleanup_engine"] = time.monotonic() - started
        run("ip", "link", "del", PARENT, check=False)
        shutil.rmtree(EXEC_ROOT, ignore_errors=True)
        sys.stderr.write(f"\ndeployment test timings (s): "
                         f"{ {k: round(v, 1) for k, v in timings.items()} }\n")


@pytest.fixture(scope="module")
def swarm(engine: Engine) -> Iterator[Swarm]:
    """A one-node swarm with the inventory, secrets and folders for the stack."""
    base, timings = engine.base, engine.timings
    try:
        docker("swarm", "init", "--advertise-addr", "127.0.0.1", "--default-addr-pool",
               "198.18.192.0/18", "--default-addr-pool-mask-length", "24")
        node = docker("info", "--format", "{{.Swarm.NodeID}}")
        docker("node", "update", "--label-add", "melter.redis=true", "--label-add",
               "melter.render=true", node)
        _veth()
        inventory = base / "inventory.yaml"
        inventory.write_text(yaml.safe_dump({
            "subnet": str(SUBNET), "gateway": str(GATEWAY), "network": NETWORK,
            "nodes": [{"name": "local", "parent": PARENT, "slots": SLOTS}]}))
        passwords = {secret: secrets.token_urlsafe(16) for secret in SECRETS}
        for secret, value in passwords.items():
            result = subprocess.run(["docker", "secret", "create", secret, "-"], input=value,
                                    capture_output=True, text=True, timeout=60,
                                    env={**os.environ, "DOCKER_HOST": DOCKER_HOST})
            assert result.returncode == 0, result.stderr

        recordings, renders = base / "recordings", base / "renders"
        shutil.copytree(FIXTURE, recordings / "meeting")
        renders.mkdir()
        renders.chmod(0o777)  # the image's user (uid 10001) writes here
        env = {
            "MELTER_WORKERS": str(SLOTS),
            # The scheduler's cap above the node's slots: the address block alone must stop
            # the extra workers.
            "MELTER_SLOTS": "8",
            "MELTER_NETWORK": NETWORK,
            "NFS_SERVER": "unused",
            "MELTER_RECORDINGS_DIR": str(recordings),
            "MELTER_RENDERS_DIR": str(renders),
            "MELTER_FLOWER_PORT": "25555",
            "MELTER_API_PORT": "28080",
        }
        yield Swarm(base, recordings, renders, inventory, env, timings, passwords)
    finally:
        _remove_stack(timings)


def _http_status(url: str, authorization: str | None = None) -> int:
    """The HTTP status of a GET (0 when nothing answers)."""
    request = urllib.request.Request(url)
    if authorization is not None:
        request.add_header("Authorization", authorization)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except OSError:
        return 0


def _compose_command() -> list[str] | None:
    if run("docker", "compose", "version", check=False).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def _flower_status(port: str, password: str | None) -> int:
    basic = base64.b64encode(f"melter:{password}".encode()).decode()
    return _http_status(f"http://127.0.0.1:{port}/",
                        None if password is None else f"Basic {basic}")


# -- the test ---------------------------------------------------------------------------------
def _override(base: Path) -> Path:
    """Test-only changes: small reservations so that five workers fit on two cores, and a
    short grace period for the cleanup."""
    override: dict[str, Any] = {
        "version": "3.9",
        "services": {"worker": {"stop_grace_period": "30s", "deploy": {"resources": {
            "reservations": {"cpus": "0.1", "memory": "64M"}}}}},
    }
    path = base / "test-override.yml"
    path.write_text(yaml.safe_dump(override, sort_keys=False))
    return path


def _measure(path: Path) -> tuple[float, dict[str, float]]:
    """The file's duration, and the share of the frame at 12.5 s close to each colour."""
    with av.open(str(path)) as container:
        duration = float(container.duration or 0) / av.time_base
        stream = container.streams.video[0]
        container.seek(int(12 / stream.time_base), stream=stream)
        frame = None
        for candidate in container.decode(stream):
            if candidate.time is not None and candidate.time >= 12.5:
                frame = candidate.to_ndarray(format="rgb24").astype(np.int16)
                break
    assert frame is not None
    shares = {}
    for name, rgb in COLOURS.items():
        close = np.abs(frame - np.array(rgb, dtype=np.int16)).max(axis=2) <= 30
        shares[name] = round(float(close.mean()), 3)
    return duration, shares


def test_one_command_starts_the_development_stack_and_it_renders(engine: Engine) -> None:
    compose = _compose_command()
    if compose is None:
        pytest.skip("neither `docker compose` nor docker-compose (apt-get install "
                    "docker-compose)")
    data, secrets_dir = engine.base / "dev-data", engine.base / "dev-secrets"
    shutil.copytree(FIXTURE, data / "recordings" / "meeting")
    env = {"MELTER_DEV_DATA": str(data), "MELTER_DEV_SECRETS": str(secrets_dir),
           "MELTER_DEV_FLOWER_PORT": "25556", "MELTER_DEV_API_PORT": "28081"}
    project = ["-f", str(ROOT / "compose" / "compose.yml"), "-p", "melter-dev"]
    started = time.monotonic()
    try:
        run(str(ROOT / "compose" / "up"), env=env, timeout=900)
        engine.timings["compose_up"] = time.monotonic() - started

        def workers(*filters: str) -> list[str]:
            return docker("ps", "-q", "--filter", "label=com.docker.compose.project=melter-dev",
                          "--filter", "label=com.docker.compose.service=worker",
                          *filters).split()

        wait_for("2 healthy dev workers", lambda: len(workers("--filter", "health=healthy"))
                 == 2, 120)
        engine.timings["compose_to_healthy"] = time.monotonic() - started
        worker = workers()[0]
        # The image carries the compiled MJR passes built on this machine (workers/build-image).
        compiled = docker("exec", worker, "python3", "-c",
                          "import melter.track as t; print(t._fastpath is not None)")
        assert compiled.strip() == "True", compiled
        job = docker("exec", worker, "melter", "submit", "/srv/melter/recordings/meeting",
                     "--layout", "grid", "-o", "/srv/melter/renders/meeting.mp4")
        docker("exec", worker, "melter", "status", job, "--watch", timeout=300)
        engine.timings["compose_render"] = time.monotonic() - started
        duration, shares = _measure(data / "renders" / "meeting.mp4")
        sys.stderr.write(f"\ndev stack: meeting.mp4 {duration:.3f} s, colour shares {shares}\n")
        assert abs(duration - LOCAL_DURATION) < 0.25, duration
        assert all(share > 0.05 for share in shares.values()), shares
        password = (secrets_dir / "flower_password").read_text().strip()
        wait_for("the dev Flower", lambda: _flower_status("25556", None) == 401, 120)
        assert _flower_status("25556", password) == 200
    finally:
        run(*compose, *project, "down", "--volumes", "--timeout", "30", env=env, check=False)


def test_the_stack_renders_and_the_address_block_caps_the_workers(swarm: Swarm) -> None:
    # The network from the plan, through the Docker SDK; idempotent; a conflict is one line.
    plan = json.loads(melter("swarm", "plan", "--json", str(swarm.inventory)).stdout)
    block = ipaddress.ip_network(plan["nodes"][0]["ip_range"])
    aux = {ipaddress.ip_address(a) for a in plan["nodes"][0]["aux_addresses"]}
    assignable = {a for a in block if a not in aux}
    assert len(assignable) == SLOTS and block.subnet_of(SUBNET)
    first = melter("swarm", "apply", str(swarm.inventory)).stdout
    assert first.count("created") == 2, first
    again = melter("swarm", "apply", str(swarm.inventory)).stdout
    assert again.count("unchanged") == 2, again
    other = swarm.base / "other.yaml"
    other.write_text(swarm.inventory.read_text().replace(f"slots: {SLOTS}", "slots: 6"))
    conflict = melter("swarm", "apply", str(other), check=False)
    assert conflict.returncode == 1
    assert "exists with other settings: ip-range" in conflict.stderr
    assert conflict.stderr.count("\n") == 1 and "Traceback" not in conflict.stderr

    # Deploy.
    override = _override(swarm.base)
    started = time.monotonic()
    docker("stack", "deploy", "-c", str(ROOT / "stack.yml"), "-c",
           str(ROOT / "stack.local.yml"), "-c", str(override), STACK, env=swarm.env)
    wait_for(f"{SLOTS} healthy workers", lambda: len(swarm.healthy_workers()) == SLOTS, 240)
    swarm.timings["deploy_to_healthy"] = time.monotonic() - started

    # Redis wants the password from the secret.
    redis_container = swarm.containers("redis")[0]
    assert "NOAUTH" in docker("exec", redis_container, "redis-cli", "ping", check=False)
    assert docker("exec", "-e", f"REDISCLI_AUTH={swarm.passwords['melter_redis_password']}",
                  redis_container, "redis-cli", "ping") == "PONG"
    assert docker("exec", "-e", f"REDISCLI_AUTH={swarm.passwords['melter_redis_password']}",
                  redis_container, "redis-cli", "config", "get", "appendonly").split() == [
        "appendonly", "yes"]

    # Flower answers on the node's port, only with the password from the secret.
    def flower(password: str | None) -> int:
        return _flower_status(swarm.env["MELTER_FLOWER_PORT"], password)

    wait_for("Flower", lambda: flower(None) == 401, 120)
    assert flower("wrong") == 401
    assert flower(swarm.passwords["melter_flower_password"]) == 200
    # melter serve: /healthz open, the jobs API only with the token from the secret.
    api = f"http://127.0.0.1:{swarm.env['MELTER_API_PORT']}"
    wait_for("melter serve's /healthz", lambda: _http_status(f"{api}/healthz") == 200, 120)
    assert _http_status(f"{api}/jobs") == 401
    assert _http_status(f"{api}/jobs", "Bearer wrong") == 401
    assert _http_status(f"{api}/jobs", f"Bearer {swarm.passwords['melter_api_token']}") == 200

    # Each worker has its own address from the node's block.
    addresses = set()
    for container in swarm.containers("worker"):
        info = json.loads(docker("inspect", container))[0]
        addresses.add(ipaddress.ip_address(
            info["NetworkSettings"]["Networks"][NETWORK]["IPAddress"]))
    assert addresses <= assignable and len(addresses) == SLOTS, (addresses, assignable)

    # Three renders of the real recording, one per worker; scale past the slots meanwhile.
    started = time.monotonic()
    jobs = [swarm.in_worker("melter", "submit", "/srv/melter/recordings/meeting", "--layout",
                            "grid", "-o", f"/srv/melter/renders/meeting-{n}.mp4")
            for n in range(SLOTS)]
    wait_for("a running render", lambda: any(
        json.loads(swarm.in_worker("melter", "status", job, "--json"))["state"] == "running"
        for job in jobs), 120)
    before = set(swarm.containers("worker"))
    docker("service", "scale", "--detach", f"{STACK}_worker={SCALED}")

    def refused() -> list[dict[str, str]]:
        return [t for t in swarm.tasks("worker") if "no available IPv4 addresses" in t["Error"]]

    refusals = wait_for("tasks refused for lack of addresses", refused, 120)
    states: dict[str, dict[str, Any]] = {}

    def finished() -> bool:
        for job in jobs:
            states[job] = json.loads(swarm.in_worker("melter", "status", job, "--json"))
        return all(s["state"] in ("done", "failed", "cancelled") for s in states.values())

    running_during: list[int] = []

    def finished_counting() -> bool:
        running_during.append(sum(1 for t in swarm.tasks("worker")
                                  if t["CurrentState"].startswith("Running")))
        return finished()

    wait_for("the renders", finished_counting, 600, every=2)
    swarm.timings["renders"] = time.monotonic() - started
    assert all(s["state"] == "done" for s in states.values()), states
    refusals = refused()
    running = [t for t in swarm.tasks("worker") if t["CurrentState"].startswith("Running")]
    replicas = docker("service", "ls", "--filter", f"name={STACK}_worker", "--format",
                      "{{.Replicas}}")
    sys.stderr.write(f"\nscaled to {SCALED}: replicas {replicas}; {len(running)} running; "
                     f"{len(refusals)} refusals: {refusals[0]['Error']!r}\n")
    assert len(running) == SLOTS and max(running_during) == SLOTS, running_during
    # Only the tasks beyond the slots were refused, again and again (Swarm retries them).
    assert {t["Name"] for t in refusals} == {f"{STACK}_worker.{n}"
                                             for n in range(SLOTS + 1, SCALED + 1)}, refusals
    assert replicas.startswith(f"{SLOTS}/{SCALED}"), replicas
    # The workers that had addresses were not touched by the scaling.
    assert set(swarm.containers("worker")) == before

    # The outputs, measured.
    for n, job in enumerate(jobs):
        output = swarm.renders / f"meeting-{n}.mp4"
        duration, shares = _measure(output)
        sys.stderr.write(f"{output.name}: {duration:.3f} s, colour shares at 12.5 s {shares}, "
                         f"worker {states[job]['worker']}\n")
        assert abs(duration - LOCAL_DURATION) < 0.25, duration
        assert all(share > 0.05 for share in shares.values()), shares
        manifest = json.loads((swarm.renders / f"meeting-{n}.mp4.manifest.json").read_text())
        assert manifest["job"] == job, manifest.get("job")
        assert os.stat(output).st_uid == 10001  # written by the image's unprivileged user
