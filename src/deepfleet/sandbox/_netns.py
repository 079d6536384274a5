"""Network namespaces for sandbox devices: one namespace, one veth pair, one /24 each.

Device N lives in namespace ``deepfleet-N`` at 10.200.N.2; this machine's end of the link is
``dfhN`` at 10.200.N.1. A route ``unreachable 10.200.0.0/16`` in the root namespace makes traffic
for a device whose link is down fail at once instead of leaving the machine (FLEET-NOTES).

Link shaping uses what this kernel has: ``tc`` tbf for bandwidth (there is no netem) and an
nftables ``numgen random`` rule for loss. A cut link is an nftables drop-all table inside the
namespace, so packets vanish silently as on a real dead link.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from deepfleet.sandbox._proc import kill_pids, sh

__all__ = ["Netns", "create", "cut", "delete", "heal", "ns_pids", "prefix_in_use", "shape"]

PREFIX = "deepfleet-"
SUBNET = "10.200.0.0/16"
_CUT_TABLE = "deepfleet_cut"
_LOSS_TABLE = "deepfleet_loss"


@dataclass(frozen=True, kw_only=True)
class Netns:
    """Names and addresses of one device's namespace (plain data, stored in the state file)."""

    index: int
    name: str
    host_if: str
    host_ip: str
    device_ip: str


def _existing() -> set[str]:
    out = sh(["ip", "netns", "list"]).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def prefix_in_use() -> bool:
    """True while any deepfleet namespace exists (then the shared route must stay)."""
    return any(n.startswith(PREFIX) for n in _existing())


def _free_index() -> int:
    used = {int(m[1]) for n in _existing() if (m := re.fullmatch(rf"{PREFIX}(\d+)", n))}
    links = sh(["ip", "-o", "link", "show"]).stdout
    used |= {int(m) for m in re.findall(r"\d+: dfh(\d+)[@:]", links)}
    for index in range(1, 255):
        if index not in used:
            return index
    raise RuntimeError("all 254 sandbox namespace slots are in use")


def create() -> Netns:
    """Create a namespace with a veth link to this machine and return its description."""
    index = _free_index()
    ns = Netns(index=index, name=f"{PREFIX}{index}", host_if=f"dfh{index}",
               host_ip=f"10.200.{index}.1", device_ip=f"10.200.{index}.2")
    sh(["ip", "netns", "add", ns.name])
    try:
        sh(["ip", "link", "add", ns.host_if, "type", "veth", "peer", "name", "eth0", "netns",
            ns.name])
        sh(["ip", "addr", "add", f"{ns.host_ip}/24", "dev", ns.host_if])
        sh(["ip", "link", "set", ns.host_if, "up"])
        sh(["ip", "-n", ns.name, "addr", "add", f"{ns.device_ip}/24", "dev", "eth0"])
        sh(["ip", "-n", ns.name, "link", "set", "eth0", "up"])
        sh(["ip", "-n", ns.name, "link", "set", "lo", "up"])
        sh(["ip", "route", "replace", "unreachable", SUBNET])
    except Exception:
        delete(ns)
        raise
    return ns


def ns_pids(ns: Netns) -> list[int]:
    """Every process inside the namespace."""
    proc = sh(["ip", "netns", "pids", ns.name], check=False)
    return [int(p) for p in proc.stdout.split()] if proc.returncode == 0 else []


def delete(ns: Netns) -> None:
    """Kill every process in the namespace (killing sshd alone would leave sessions alive), then
    remove it and its link. Idempotent."""
    kill_pids(ns_pids(ns))
    sh(["ip", "netns", "delete", ns.name], check=False)
    sh(["ip", "link", "delete", ns.host_if], check=False)  # gone with the namespace, normally
    if not prefix_in_use():
        sh(["ip", "route", "del", "unreachable", SUBNET], check=False)


def shape(ns: Netns, *, rate_kbit: int, loss_percent: float) -> None:
    """Limit the link to ``rate_kbit`` in both directions and drop ``loss_percent`` of the
    packets arriving at the device."""
    # burst must hold at least one full-size frame; latency bounds the queue.
    tbf = ["root", "tbf", "rate", f"{rate_kbit}kbit", "burst", "16kb", "latency", "300ms"]
    sh(["ip", "netns", "exec", ns.name, "tc", "qdisc", "replace", "dev", "eth0", *tbf])
    sh(["tc", "qdisc", "replace", "dev", ns.host_if, *tbf])
    if loss_percent > 0:
        _nft(ns, f"add table inet {_LOSS_TABLE}\n"
                 f"add chain inet {_LOSS_TABLE} input {{ type filter hook input priority 0; }}\n"
                 f"add rule inet {_LOSS_TABLE} input numgen random mod 1000 < "
                 f"{round(loss_percent * 10)} drop\n")


def _nft(ns: Netns, script: str) -> None:
    sh(["ip", "netns", "exec", ns.name, "nft", "-f", "-"], input=script)


def cut(ns: Netns) -> None:
    """Silently drop every packet in and out of the device (a dead link, not a closed port)."""
    _nft(ns, f"add table inet {_CUT_TABLE}\n"
             f"add chain inet {_CUT_TABLE} input {{ type filter hook input priority -10; "
             "policy drop; }\n"
             f"add chain inet {_CUT_TABLE} output {{ type filter hook output priority -10; "
             "policy drop; }\n")


def heal(ns: Netns) -> None:
    """Undo :func:`cut`."""
    sh(["ip", "netns", "exec", ns.name, "nft", "delete", "table", "inet", _CUT_TABLE],
       check=False)
