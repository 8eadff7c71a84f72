"""`custody watch`'s own metrics (served by `--metrics-port`, on loopback): its steps,
the blocks it applied and rolled back, its height and the node's tip as it last saw them,
and when it last got through a step. In the process's default registry."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

STEPS = Counter("custody_watch_steps", "Watcher steps by result (ok, failed)", ["result"])
BLOCKS_APPLIED = Counter("custody_watch_blocks_applied", "Blocks the watcher applied")
BLOCKS_ROLLED_BACK = Counter(
    "custody_watch_blocks_rolled_back", "Blocks the watcher rolled back (reorgs)"
)
HEIGHT = Gauge("custody_watch_height", "Height the watcher has applied up to")
NODE_TIP = Gauge("custody_watch_node_tip_height", "The node's tip at the watcher's last step")
LAST_STEP = Gauge(
    "custody_watch_last_step_timestamp_seconds", "Unix time of the last successful step"
)
for result in ("ok", "failed"):
    STEPS.labels(result=result)
