"""Orchestration: the fleet of devices, how to reach them, and (later) the search loop.

- :mod:`~deepfleet.orchestrator.fleet`: the fleet file (``load_fleet``) and the built-in
  ``local`` device;
- :mod:`~deepfleet.orchestrator.transport`: the :class:`Transport` plug-in point (run, upload,
  persistent JSON-lines process) and its local implementation; ``open_transport(device)``;
- :mod:`~deepfleet.orchestrator.ssh`: the verified Paramiko implementation;
- :mod:`~deepfleet.sandbox`: real sshd devices on this machine for tests and demos;
- :mod:`~deepfleet.orchestrator.device`: ``DeviceSession``, the persistent agent on one device;
- :mod:`~deepfleet.orchestrator.measure`: ``measure_many`` (every artifact on every device, rows
  written as they end) and ``MeasureSettings``; :mod:`~deepfleet.orchestrator.check`:
  ``check_devices``; :mod:`~deepfleet.orchestrator.reference`: the drift reference model;
- :mod:`~deepfleet.orchestrator.results`: the one results schema and the Parquet dataset.

Those last modules are not re-exported here: they pull pyarrow and pandas, and importing this
package must stay light (Ray workers import it).
"""

from deepfleet.orchestrator.fleet import (
    LOCAL_DEVICE,
    Device,
    EnergySpec,
    Fleet,
    load_fleet,
    local_fleet,
)
from deepfleet.orchestrator.transport import (
    CommandResult,
    LocalTransport,
    RemoteProcess,
    Transport,
    UploadResult,
    open_transport,
)

__all__ = [
    "LOCAL_DEVICE",
    "CommandResult",
    "Device",
    "EnergySpec",
    "Fleet",
    "LocalTransport",
    "RemoteProcess",
    "Transport",
    "UploadResult",
    "load_fleet",
    "local_fleet",
    "open_transport",
]
