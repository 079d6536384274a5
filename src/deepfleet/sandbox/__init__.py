"""A fleet of real sshd devices on this machine, for tests and demos.

:func:`up` starts devices of several kinds (see :data:`KINDS`): x86 in a network namespace, an
Edison stand-in (32-bit i386 root, i686, CPU quota, simulated power sensor), ARM roots emulated by
qemu-user, and a device behind a slow, lossy link. It returns the path of a generated fleet.yaml;
:func:`down` removes everything. :func:`cut_link`, :func:`stop_device` and friends inject faults.

Module map: ``_kinds`` (what each kind is), ``_roots`` (Debian roots and their cache),
``_runtimes`` (onnxruntime where PyPI has a wheel for the device's CPU: x86 and arm64), ``_netns``
(namespaces and links), ``_cgroup`` (CPU quota and CPU time), ``_sshd`` (keys, config,
servers), ``_device`` (one device's lifetime), ``_state`` (the record ``down`` reads), ``_up``
(up/down), ``_faults``. The simulated power sensor is :mod:`deepfleet.device_agent.powersim`,
run in its cgroup-counter mode.
"""

from deepfleet.sandbox._faults import cut_link, heal_link, start_device, stop_device
from deepfleet.sandbox._kinds import DEFAULT_KINDS, KINDS, Kind
from deepfleet.sandbox._sshd import LoopbackSshd
from deepfleet.sandbox._state import SandboxDevice, SandboxState, read_state
from deepfleet.sandbox._up import default_state_dir, down, up

__all__ = [
    "DEFAULT_KINDS",
    "KINDS",
    "Kind",
    "LoopbackSshd",
    "SandboxDevice",
    "SandboxState",
    "cut_link",
    "default_state_dir",
    "down",
    "heal_link",
    "read_state",
    "start_device",
    "stop_device",
    "up",
]
