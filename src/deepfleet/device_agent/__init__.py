"""The device side of deepfleet: the artifact format as a library, and the agent shipped to devices.

Libraries host code imports (Python >= 3.8, standard library + numpy, nothing else):

- ``format.py``: the artifact format: its files, its hash (``artifact_digest``), the one
  artifact check (``check_artifact``), tensor encodings (``decode_tensor``), manifest helpers;
- ``runtime.py``: the format's numpy runtime (the ops, ``Model``, ``load_model``), the oracle
  exporters are tested against and the runtime of devices without onnxruntime;
- ``protocol.py``: the device protocol's request schema (``parse_measure`` ..., ``AgentError``).

The device program (never imported by host code; a test checks the import rules):

- ``agent.py``: ``python3 agent.py serve``, the JSON-lines measurement protocol (latency
  distribution, model load, peak memory, CPU time, energy per inference, provenance), with its
  parts ``system.py`` (CPU, clocks, thermal, BLAS threads, peak resident memory),
  ``backends.py`` (the ``Backend`` runtimes, which one ``backend: auto`` picks, the model cache)
  and ``energy.py`` (the ``EnergySource`` meters, sampling, the energy result and estimates).

Devices get ONE file with one hash: ``bundle.py`` builds it from ``agent.py`` by inlining the
libraries in place of their import lines (deterministic: same sources, same bytes), and caches it
as ``$DEEPFLEET_CACHE/agent/<sha256>/agent.py``; ``orchestrator/device.py`` uploads that file,
and the agent's ``hello`` reports its sha256.

- ``powersim.py``: a SIMULATED hwmon power sensor (stdlib only) for tests and sandbox devices;
  the agent reads it through its real hwmon code and labels the results simulated.

Importing this package imports none of them (the libraries pull numpy; ``powersim`` is a script).
"""
