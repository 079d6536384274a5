"""One Ray actor per device: it owns the device's session and writes its rows at once.

Actors are pinned to the driver's node (where the fleet file, the SSH keys and the run
directory are). Each measurement goes through :func:`deepfleet.orchestrator.measure.measure_many`
with the actor's own session and reference tracker, so rows (and failure rows, and the periodic
reference-model rows that show drift) are in the Parquet dataset the moment the agent answers,
before anything is returned: a driver that dies a second later loses nothing that was measured.
"""

from __future__ import annotations

from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from deepfleet.errors import DeviceError
from deepfleet.orchestrator.device import DeviceSession
from deepfleet.orchestrator.fleet import Device
from deepfleet.orchestrator.measure import MeasureSettings, measure_many
from deepfleet.orchestrator.reference import ReferenceTracker


class DeviceWorker:
    """Measures artifact directories on one device, one at a time; plain Python."""

    def __init__(self, device: Device, results_root: str, study: str, settings: MeasureSettings):
        self.device = device
        self.results_root = results_root
        self.study = study
        self.settings = settings
        self.sessions: dict[str, DeviceSession] = {}
        self.tracker = ReferenceTracker()

    def measure(self, artifact: str, trial: int | None) -> list[dict[str, Any]]:
        """Measure ``artifact``; return the rows written (reference rows included).

        Raises DeviceError naming the device and the cause (its failure row is written first),
        so the caller can try another device of the class.
        """
        outcomes = measure_many([self.device], [artifact], results_root=self.results_root,
                                settings=self.settings, study=self.study, trial=trial,
                                tracker=self.tracker, sessions=self.sessions)
        main = [o for o in outcomes if not o.reference]
        if not main or not main[0].ok:
            raise DeviceError(main[0].error if main and main[0].error else
                              f"device {self.device.name!r}: no measurement of {artifact}")
        return [o.row for o in outcomes]

    def close(self) -> None:
        for session in self.sessions.values():
            session.close()
        self.sessions.clear()


_DeviceActor = ray.remote(num_cpus=0)(DeviceWorker)


def start_device_actors(devices: list[Device], results_root: str, study: str, node_id: str,
                        settings: MeasureSettings) -> dict[str, Any]:
    """{device name: actor handle}, every actor pinned to ``node_id``."""
    strategy = NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
    return {
        d.name: _DeviceActor.options(scheduling_strategy=strategy).remote(d, results_root, study, settings)
        for d in devices
    }
