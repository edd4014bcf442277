"""``melter swarm apply``: create a plan's networks through each node's Docker engine.

Each node gets its ``--config-only`` network (its own ``--ip-range`` block) on its own engine,
then one manager gets the swarm-scoped macvlan network built from them. Running it again is
safe: a network that already exists with the planned settings is left alone; one that exists
with other settings is an error naming the difference, because Docker cannot change a network's
addresses in place and a silent mismatch is exactly the overlapping-ranges failure the plan
exists to prevent.

The Docker SDK has no arguments for ``ConfigOnly``/``ConfigFrom`` (Engine API 1.30+), so the
create calls post the API's JSON body through the SDK's client.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from melter.errors import MelterError
from melter.swarm.placement import NodeBlock, SwarmPlan

DEFAULT_ENGINE = "unix:///var/run/docker.sock"
TIMEOUT = 15


@dataclass(frozen=True)
class Action:
    """What apply did (or, in a dry run, would do) on one engine."""

    node: str
    network: str
    verb: str  # "create" or "unchanged"
    detail: str

    def line(self, dry_run: bool) -> str:
        verb = self.verb
        if verb == "create":
            verb = "would create" if dry_run else "created"
        return f"{self.node}: {verb} {self.network} ({self.detail})"


def engine_urls(plan: SwarmPlan, given: list[str]) -> dict[str, str]:
    """Engine URL per node from ``NAME=URL`` pairs; a one-node inventory defaults to the local
    engine (``DOCKER_HOST`` or the default socket)."""
    urls: dict[str, str] = {}
    names = [b.node for b in plan.blocks]
    for item in given:
        name, sep, url = item.partition("=")
        if not sep or not name or not url:
            raise MelterError(f"--node-url {item!r}: expected NAME=URL (unix://... or tcp://...)")
        if name not in names:
            raise MelterError(f"--node-url {item!r}: no node {name!r} in the inventory "
                              f"({', '.join(names)})")
        urls[name] = url
    missing = [n for n in names if n not in urls]
    if missing == names and len(names) == 1:
        urls[names[0]] = os.environ.get("DOCKER_HOST") or DEFAULT_ENGINE
    elif missing:
        raise MelterError(f"no engine URL for node(s) {', '.join(missing)}: give --node-url "
                          f"NAME=tcp://HOST:2376 (or unix://...) for each node")
    return urls


def _reason(exc: BaseException) -> str:
    """The innermost cause of a connection error, on one short line."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        inner = exc.__cause__ or exc.__context__
        assert inner is not None
        exc = inner
    text = " ".join(str(exc).split()) or type(exc).__name__
    if "Connection refused" in text:
        return "connection refused"
    if "No such file or directory" in text:
        return "no such socket"
    if "Name or service not known" in text or "Temporary failure in name resolution" in text:
        return "unknown host"
    if "timed out" in text.lower():
        return "timed out"
    return text[-160:]


def connect(node: str, url: str) -> Any:
    """A Docker client for ``url``, or a one-line :class:`MelterError` when it cannot answer."""
    import docker
    import docker.errors

    try:
        client = docker.DockerClient(base_url=url, timeout=TIMEOUT)
        client.ping()
    except (docker.errors.DockerException, OSError, ValueError) as exc:
        raise MelterError(f"node {node}: cannot reach the Docker engine at {url} "
                          f"({_reason(exc)})") from None
    except Exception as exc:  # requests' own errors, which the SDK does not wrap
        raise MelterError(f"node {node}: cannot reach the Docker engine at {url} "
                          f"({_reason(exc)})") from None
    return client


def _inspect(client: Any, name: str) -> dict[str, Any] | None:
    """The network called exactly ``name``, or None."""
    for found in client.api.networks(names=[name]):
        if found.get("Name") == name:
            return client.api.inspect_network(found["Id"])  # type: ignore[no-any-return]
    return None


def _config_body(plan: SwarmPlan, block: NodeBlock) -> dict[str, Any]:
    inv = plan.inventory
    return {
        "Name": plan.config_name,
        "CheckDuplicate": True,
        "ConfigOnly": True,
        "Options": {"parent": block.parent},
        "IPAM": {"Driver": "default", "Config": [{
            "Subnet": str(inv.subnet), "IPRange": str(block.ip_range),
            "Gateway": str(inv.gateway),
            "AuxiliaryAddresses": {f"spare{i}": str(a) for i, a in enumerate(block.aux)},
        }]},
    }


def config_differences(existing: dict[str, Any], plan: SwarmPlan, block: NodeBlock) -> list[str]:
    """How an existing config-only network differs from the node's planned one."""
    wanted = _config_body(plan, block)
    problems: list[str] = []
    if not existing.get("ConfigOnly"):
        problems.append("it is not a --config-only network")
    parent = (existing.get("Options") or {}).get("parent")
    if parent != block.parent:
        problems.append(f"parent {parent} (plan: {block.parent})")
    configs = (existing.get("IPAM") or {}).get("Config") or []
    if len(configs) != 1:
        problems.append(f"{len(configs)} IPAM pools (plan: 1)")
        return problems
    have, want = configs[0], wanted["IPAM"]["Config"][0]
    for key, flag in (("Subnet", "subnet"), ("IPRange", "ip-range"), ("Gateway", "gateway")):
        if have.get(key) != want[key]:
            problems.append(f"{flag} {have.get(key) or '-'} (plan: {want[key]})")
    have_aux = {ipaddress.ip_address(a) for a in (have.get("AuxiliaryAddresses") or {}).values()}
    if have_aux != set(block.aux):
        problems.append(f"{len(have_aux)} aux addresses (plan: {len(block.aux)})")
    return problems


def _ensure_config(client: Any, plan: SwarmPlan, block: NodeBlock, dry_run: bool) -> Action:
    name = plan.config_name
    detail = f"ip-range {block.ip_range}, {block.slots} slots, parent {block.parent}"
    existing = _inspect(client, name)
    if existing is not None:
        problems = config_differences(existing, plan, block)
        if problems:
            raise MelterError(f"node {block.node}: network {name} exists with other settings: "
                              f"{'; '.join(problems)}; remove it (docker network rm {name}) "
                              f"or choose another config_name")
        return Action(block.node, name, "unchanged", detail)
    if not dry_run:
        _post(client, block.node, _config_body(plan, block))
    return Action(block.node, name, "create", detail)


def _ensure_swarm_network(client: Any, node: str, plan: SwarmPlan, dry_run: bool) -> Action:
    name = plan.inventory.network
    detail = f"macvlan, swarm scope, from {plan.config_name}"
    existing = _inspect(client, name)
    if existing is not None:
        problems = []
        if existing.get("Driver") != "macvlan":
            problems.append(f"driver {existing.get('Driver')} (plan: macvlan)")
        if existing.get("Scope") != "swarm":
            problems.append(f"scope {existing.get('Scope')} (plan: swarm)")
        source = (existing.get("ConfigFrom") or {}).get("Network")
        if source != plan.config_name:
            problems.append(f"config-from {source or '-'} (plan: {plan.config_name})")
        if problems:
            raise MelterError(f"node {node}: network {name} exists with other settings: "
                              f"{'; '.join(problems)}; remove it (docker network rm {name}) "
                              f"first")
        return Action(node, name, "unchanged", detail)
    if not dry_run:
        _post(client, node, {"Name": name, "CheckDuplicate": True, "Driver": "macvlan",
                             "Scope": "swarm", "Attachable": True,
                             "ConfigFrom": {"Network": plan.config_name}})
    return Action(node, name, "create", detail)


def _post(client: Any, node: str, body: dict[str, Any]) -> None:
    import docker.errors

    api = client.api
    try:
        api._result(api._post_json(api._url("/networks/create"), data=body), True)
    except docker.errors.APIError as exc:
        message = " ".join(str(exc.explanation or exc).split())
        raise MelterError(f"node {node}: creating network {body['Name']} failed: "
                          f"{message}") from None


def _is_manager(client: Any) -> bool:
    swarm = client.info().get("Swarm") or {}
    return bool(swarm.get("ControlAvailable"))


def apply(plan: SwarmPlan, urls: dict[str, str], manager: str | None = None,
          dry_run: bool = False, report: Callable[[str], None] = print,
          connector: Callable[[str, str], Any] = connect) -> list[Action]:
    """Create (or check) every node's config-only network, then the swarm network on a
    manager. All engines are reached and checked before anything is created."""
    clients = {block.node: connector(block.node, urls[block.node]) for block in plan.blocks}
    if manager is not None and manager not in clients:
        raise MelterError(f"--manager {manager}: no such node in the inventory")
    chosen = manager or next((n for n, c in clients.items() if _is_manager(c)), None)
    if chosen is None:
        raise MelterError("no node in the inventory is a swarm manager: run `docker swarm "
                          "init` on one (or join the nodes to the swarm first)")
    if not _is_manager(clients[chosen]):
        raise MelterError(f"node {chosen} is not a swarm manager")
    # Check every existing network (a conflict raises) before creating anything anywhere.
    for block in plan.blocks:
        _ensure_config(clients[block.node], plan, block, dry_run=True)
    _ensure_swarm_network(clients[chosen], chosen, plan, dry_run=True)
    actions = []
    for block in plan.blocks:
        action = _ensure_config(clients[block.node], plan, block, dry_run)
        report(action.line(dry_run))
        actions.append(action)
    action = _ensure_swarm_network(clients[chosen], chosen, plan, dry_run)
    report(action.line(dry_run))
    actions.append(action)
    return actions
