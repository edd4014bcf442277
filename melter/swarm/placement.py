"""One macvlan IP per worker slot: per-node address blocks for a swarm-scoped macvlan network.

Swarm-scoped macvlan networks take their addresses from a ``--config-only`` network on each
node, and each node's IPAM hands out addresses on its own (moby#49921): ranges must not overlap
across nodes. Docker wants a CIDR block per node (``--ip-range``); a block holds a power of two
addresses, so the addresses beyond a node's slots are taken out with ``--aux-address``. The
node then has exactly its slots: a task over that number fails on that node for lack of
addresses instead of taking an address another node also hands out.
"""

from __future__ import annotations

import bisect
import ipaddress
import shlex
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from melter.errors import InputError, MelterError, validation_problems


class Node(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    parent: str = Field(..., min_length=1, description="host interface the macvlan hangs off")
    slots: int = Field(..., ge=1, le=4096, description="worker containers on this node")


class Inventory(BaseModel):
    model_config = ConfigDict(extra="forbid")
    subnet: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address
    network: str = Field("meltnet", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    config_name: str | None = Field(None, description="per-node config-only network name")
    reserved: list[ipaddress.IPv4Address] = Field(
        default_factory=list, description="addresses no container may take (routers, hosts)"
    )
    nodes: list[Node] = Field(..., min_length=1)

    @field_validator("nodes")
    @classmethod
    def _unique(cls, nodes: list[Node]) -> list[Node]:
        names = [n.name for n in nodes]
        if len(names) != len(set(names)):
            raise ValueError(f"node names must be unique (got {names})")
        return nodes


@dataclass(frozen=True)
class NodeBlock:
    node: str
    parent: str
    ip_range: ipaddress.IPv4Network
    slots: int
    aux: tuple[ipaddress.IPv4Address, ...]

    @property
    def assignable(self) -> list[ipaddress.IPv4Address]:
        excluded = set(self.aux)
        return [a for a in self.ip_range if a not in excluded]


@dataclass(frozen=True)
class SwarmPlan:
    inventory: Inventory
    blocks: list[NodeBlock]

    @property
    def config_name(self) -> str:
        return self.inventory.config_name or f"{self.inventory.network}-config"

    def node_command(self, block: NodeBlock) -> list[str]:
        inv = self.inventory
        command = ["docker", "network", "create", "--config-only",
                   "--subnet", str(inv.subnet), "--gateway", str(inv.gateway),
                   "--ip-range", str(block.ip_range)]
        for number, address in enumerate(block.aux):
            command += ["--aux-address", f"spare{number}={address}"]
        command += ["-o", f"parent={block.parent}", self.config_name]
        return command

    def swarm_command(self) -> list[str]:
        return ["docker", "network", "create", "-d", "macvlan", "--scope", "swarm",
                "--attachable", "--config-from", self.config_name, self.inventory.network]

    def script(self) -> str:
        lines = []
        for block in self.blocks:
            lines.append(f"# on {block.node}: {block.slots} slots in {block.ip_range}")
            lines.append(shlex.join(self.node_command(block)))
        lines.append("# once, on a manager")
        lines.append(shlex.join(self.swarm_command()))
        return "\n".join(lines) + "\n"


def _block_size(slots: int) -> int:
    size = 1
    while size < slots:
        size *= 2
    return size


def plan(inventory: Inventory) -> SwarmPlan:
    """Blocks for every node, or :class:`MelterError` saying why the inventory does not fit."""
    subnet = inventory.subnet
    if inventory.gateway not in subnet:
        raise MelterError(f"gateway {inventory.gateway} is outside the subnet {subnet}")
    forbidden = sorted({int(a) for a in (subnet.network_address, subnet.broadcast_address,
                                         inventory.gateway, *inventory.reserved)})
    # Free address intervals [first, end), ascending: each block is the lowest aligned one
    # that fits, as a scan of every candidate block would find, in time linear in the nodes.
    free = [(int(subnet.network_address), int(subnet.broadcast_address) + 1)]
    blocks: dict[str, NodeBlock] = {}
    # Largest blocks first: aligned power-of-two blocks then pack without holes.
    for node in sorted(inventory.nodes, key=lambda n: (-n.slots, n.name)):
        size = _block_size(node.slots)
        prefix = 32 - size.bit_length() + 1
        if prefix < subnet.prefixlen:
            raise MelterError(f"node {node.name} needs {node.slots} addresses; the subnet "
                              f"{subnet} has {subnet.num_addresses}")
        found = _first_fit(free, size, forbidden)
        if found is None:
            demand = sum(n.slots for n in inventory.nodes)
            raise MelterError(
                f"inventory does not fit: no free /{prefix} block in {subnet} for node "
                f"{node.name} ({node.slots} slots); {demand} slots asked in all, the gateway "
                f"{inventory.gateway} and {len(inventory.reserved)} reserved addresses excluded"
            )
        chosen = ipaddress.IPv4Network((found, prefix))
        spare = tuple(ipaddress.IPv4Address(found + n) for n in range(node.slots, size))
        blocks[node.name] = NodeBlock(node.name, node.parent, chosen, node.slots, spare)
    return SwarmPlan(inventory, [blocks[n.name] for n in inventory.nodes])


def _first_fit(free: list[tuple[int, int]], size: int, forbidden: list[int]) -> int | None:
    """The lowest ``size``-aligned block inside one of the ``free`` intervals and holding no
    ``forbidden`` address; taken out of ``free``. None if there is none."""
    for number, (first, end) in enumerate(free):
        start = -(-first // size) * size
        while start + size <= end:
            inside = bisect.bisect_left(forbidden, start)
            if inside < len(forbidden) and forbidden[inside] < start + size:
                start = -(-(forbidden[inside] + 1) // size) * size
                continue
            pieces = [(a, b) for a, b in ((first, start), (start + size, end)) if b > a]
            free[number:number + 1] = pieces
            return start
    return None


def load_inventory(path: str) -> Inventory:
    import yaml

    try:
        with open(path) as handle:
            data = yaml.safe_load(handle)
    except OSError as exc:
        raise InputError(path, exc.strerror or str(exc)) from None
    except yaml.YAMLError as exc:
        raise InputError(path, f"not valid YAML ({exc})") from None
    try:
        return Inventory.model_validate(data)
    except ValidationError as exc:
        raise InputError(path, validation_problems(exc, "(top level)")) from None
