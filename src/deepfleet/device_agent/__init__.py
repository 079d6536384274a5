"""The device side of deepfleet.

- ``agent.py``: the ONE file copied to devices (Python >= 3.8, stdlib + numpy): the artifact
  format's numpy runtime and ``python3 agent.py serve``, the JSON-lines measurement protocol
  (latency distribution, energy per inference, provenance). See the protocol comment in it.
- ``powersim.py``: a SIMULATED hwmon power sensor (stdlib only) for tests and sandbox devices;
  the agent reads it through its real hwmon code and labels the results simulated.

Importing this package imports neither (``agent.py`` pulls numpy; ``powersim`` is a script).
"""
