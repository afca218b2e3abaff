"""The verl tests: verl 0.9.1's own FSDP2 engine on CPU (gloo). Each test module skips itself
where verl is not installed (the main CI environment); the second CI environment
(``.ci/run-verl``) installs it. The CPU platform and the engine's registration for ``cpu`` are
made by the tests (``verl_cpu.register_cpu``), never by funcprobe.

The modules skip on ``verl.workers.engine``, not on ``verl``: with ``tests/`` on ``sys.path`` (the
root conftest's folder), this folder itself imports as a namespace package named ``verl`` where
the real one is not installed."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
