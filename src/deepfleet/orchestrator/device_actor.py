"""One Ray actor per device: it owns the device's session and writes its rows at once.

Actors are pinned to the driver's node (where the fleet file, the SSH keys and the run
directory are). A measurement's rows are written to the Parquet dataset by the actor the moment
the agent answers, before anything is returned: a driver that dies a second later loses nothing
that was measured.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from deepfleet.errors import DeviceError
from deepfleet.orchestrator.device import DeviceSession
from deepfleet.orchestrator.fleet import Device
from deepfleet.orchestrator.results import failure_row, measurement_row, write_results


class DeviceWorker:
    """Measures artifacts (directories under ``artifacts``) on one device; plain Python."""

    def __init__(self, device: Device, results_root: str, study: str):
        self.device = device
        self.session = DeviceSession(device)
        self.results_root = results_root
        self.study = study

    def measure(self, artifact: str, settings: dict[str, Any], trial: int | None,
                model_name: str | None = None) -> list[dict[str, Any]]:
        """Measure; write the row (or a failure row) to Parquet; return the rows written.

        Raises DeviceError after writing the failure row, so the caller can try another device.
        """
        path = Path(artifact)
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        try:
            resp = self.session.measure(path, settings)
        except DeviceError as exc:
            row = failure_row(study=self.study, device=self.device.name,
                              device_class=self.device.device_class, artifact_hash=path.name,
                              error=str(exc), trial=trial)
            write_results(self.results_root, [row])
            raise
        row = measurement_row(resp, study=self.study, device=self.device.name,
                              device_class=self.device.device_class, trial=trial,
                              simulated=self.device.simulated, artifact_bytes=size,
                              model_name=model_name)
        write_results(self.results_root, [row])
        return [row]

    def hello(self) -> dict[str, Any]:
        return self.session.connect()

    def close(self) -> None:
        self.session.close()


_DeviceActor = ray.remote(num_cpus=0)(DeviceWorker)


def start_device_actors(devices: list[Device], results_root: str, study: str, node_id: str) -> dict[str, Any]:
    """{device name: actor handle}, every actor pinned to ``node_id``."""
    strategy = NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
    return {
        d.name: _DeviceActor.options(scheduling_strategy=strategy, name=None).remote(d, results_root, study)
        for d in devices
    }
