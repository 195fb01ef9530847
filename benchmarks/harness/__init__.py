"""The parts of `benchmarks/run.py`, one module per concern.

config      what the command line asked (a frozen `Config`) and the fixed paths and bounds
processes   starting and stopping the upstream, the servers and their PostgreSQL; pinning
measure     one measured load run against one server, with its server-side figures
capacity    the capacity search: the largest C within the latency bound
profiling   py-spy of sse-llm under load, and its hottest functions
machine     what the report says about the machine and the code measured
report      the Markdown table, issue 5's targets and the report file
"""

import sys
from pathlib import Path

# The harness shares tests/support.py (free_port, wait_until): `python benchmarks/run.py`
# puts benchmarks/ on the path, not the project root that holds tests/.
_ROOT = str(Path(__file__).resolve().parent.parent.parent)
if _ROOT not in sys.path:
    sys.path.append(_ROOT)
