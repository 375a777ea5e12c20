"""Every node must see the run directory: checked before a run on several nodes writes anything there.

Reflect actors write their shards, Train workers their checkpoints and metrics, and evaluate actors load the
distilled student, all directly in ``run.output_dir``, wherever Ray places them. A local path that is not
the same shared file system on every node (a mount that failed, a config that only made an empty folder:
review F3) scatters shards and checkpoints over the nodes' own disks, and the stages then fail in ways that
name nothing. So the driver writes a marker into the run directory and a task pinned to each alive node
reads it back; a node that cannot see it stops the run (exit 2) naming the node and the path.

An object-store run directory (``s3://...``) is reached over the network by every node: nothing to check.
Nodes that join later (an autoscaler) are not covered: mount the file system in the node's image or setup.

Test seam: a node whose raylet has ``SRD_TEST_NODE_DISK=<folder>`` sees local paths under that folder, as
a node with a disk of its own would (``tests/test_several_nodes.py``).
"""

from __future__ import annotations

import os
import socket
import uuid

from srd_ray import storage
from srd_ray.errors import RunDirError
from srd_ray.storage import Location

NODE_DISK = "SRD_TEST_NODE_DISK"
TIMEOUT_S = 120.0


def read_marker(path: str, token: str) -> tuple[str, bool]:
    """On one node: its host name, and whether it reads ``token`` at ``path``."""
    local = os.environ.get(NODE_DISK, "") + path
    try:
        with open(local, encoding="utf-8") as handle:
            return socket.gethostname(), handle.read() == token
    except OSError:
        return socket.gethostname(), False


def check_every_node_sees(run_dir: Location) -> None:
    """On a cluster of more than one node with a local run directory: the marker written here is read back
    on every alive node, or the run stops naming the nodes that cannot see it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [node for node in ray.nodes() if node.get("Alive")]
    if not run_dir.is_local or len(nodes) < 2:
        return
    token = uuid.uuid4().hex
    marker = run_dir / f".srd-shared-check-{token[:8]}"
    storage.write_bytes(marker, token.encode())
    probe = ray.remote(num_cpus=0, max_retries=0)(read_marker)
    try:
        calls = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
                 .remote(marker.path, token) for node in nodes]  # fmt: skip
        seen = ray.get(calls, timeout=TIMEOUT_S)
    finally:
        storage.delete(marker)
    blind = [f"node {node['NodeID'][:8]} at {node['NodeManagerAddress']} ({host})"
             for node, (host, ok) in zip(nodes, seen, strict=True) if not ok]  # fmt: skip
    if blind:
        raise RunDirError(
            f"run.output_dir: {len(blind)} of {len(nodes)} nodes cannot see {run_dir.path}, which the driver "
            f"wrote on {socket.gethostname()}: {', '.join(blind)}. Mount the same shared file system at that path "
            "on every node (cluster/ray-up-gpu.yaml: initialization_commands), or use an object store "
            "(run.output_dir: s3://bucket/prefix)"
        )
