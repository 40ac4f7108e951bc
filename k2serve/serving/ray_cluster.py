"""The Ray cluster dedicated endpoints run on (`k2serve serve --ray [ADDRESS]`).

k2serve is a Ray driver: it connects to a running cluster (`ray start --head` elsewhere,
ADDRESS `auto` or `HOST:PORT`) or, without an address, starts a local one. Each endpoint is
a Ray Serve application of one deployment (k2serve.serving.ray_replica.EndpointReplica) that
Serve scales between the endpoint's min and max replicas on ongoing requests per replica;
k2serve reaches it through a deployment handle, so no Serve HTTP proxy runs
(proxy_location=Disabled) and every request goes through k2serve's own API and platform.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from k2serve.serving.dedicated_config import DedicatedModel, Hardware, Scaling

log = logging.getLogger("k2serve.ray")

NAMESPACE = "k2serve"
STATUS_TTL_S = 0.5
DEPLOYMENT = "replica"


@dataclass
class LocalClusterOptions:
    """A local cluster started by k2serve (no address): bounded for a small machine."""

    num_cpus: float | None = None
    num_gpus: float | None = None
    object_store_memory: int | None = 256 << 20


def ray_available() -> bool:
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        return False
    return True


class RayCluster:
    def __init__(self, address: str | None = None, local: LocalClusterOptions | None = None):
        import ray
        from ray import serve

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback cluster of our own
        kwargs: dict[str, Any] = {"namespace": NAMESPACE, "log_to_driver": False,
                                  "ignore_reinit_error": True}
        if address:
            kwargs["address"] = address
        else:
            local = local or LocalClusterOptions()
            kwargs.update(include_dashboard=False, num_cpus=local.num_cpus,
                          num_gpus=local.num_gpus, object_store_memory=local.object_store_memory)
        ray.init(**kwargs)
        serve.start(proxy_location="Disabled")
        self.address = address or "local"
        self._status_cache = None

    # -- applications -------------------------------------------------------------------
    def deploy(self, app_name: str, model: DedicatedModel, hardware: Hardware, scaling: Scaling,
               min_replicas: int, max_replicas: int) -> None:
        """Create or update the endpoint's application (asynchronously: its replicas start
        in the background). With the same model and hardware, a change of replica bounds is
        applied in place (Serve's lightweight update: running replicas stay)."""
        from ray import serve

        from k2serve.serving.ray_replica import EndpointReplica

        deployment = serve.deployment(
            EndpointReplica, name=DEPLOYMENT,
            ray_actor_options=hardware.actor_options(),
            max_ongoing_requests=scaling.max_ongoing_requests,
            autoscaling_config=scaling.autoscaling_config(min_replicas, max_replicas),
            health_check_period_s=5, health_check_timeout_s=30,
            graceful_shutdown_timeout_s=5)
        serve._run(deployment.bind(model, hardware.num_cpus), name=app_name,
                   route_prefix=None, _blocking=False)
        self._status_cache = None

    def handle(self, app_name: str):
        from ray import serve

        return serve.get_app_handle(app_name)

    def delete(self, app_name: str) -> None:
        from ray import serve

        serve.delete(app_name, _blocking=False)
        self._status_cache = None

    def app_state(self, app_name: str) -> tuple[str | None, dict[str, int], str]:
        """(Serve's application status or None when absent, replica counts by state,
        message)."""
        status = self._status().applications.get(app_name)
        if status is None:
            return None, {}, ""
        deployment = status.deployments.get(DEPLOYMENT)
        replicas = dict(deployment.replica_states) if deployment is not None else {}
        message = status.message or (deployment.message if deployment is not None else "")
        return str(status.status.value if hasattr(status.status, "value") else status.status), \
            {str(getattr(k, "value", k)): int(v) for k, v in replicas.items()}, message

    def _status(self):
        """Serve's status, asked at most every STATUS_TTL_S (the manager reads it for each
        endpoint on each tick)."""
        from ray import serve

        now = time.monotonic()
        if self._status_cache is None or now - self._status_cache[0] > STATUS_TTL_S:
            self._status_cache = (now, serve.status())
        return self._status_cache[1]

    # -- resources ------------------------------------------------------------------------
    def nodes(self) -> list[dict[str, dict[str, float]]]:
        """Each alive node's total and available resources."""
        import ray

        available = _available_by_node()
        out = []
        for node in ray.nodes():
            if not node.get("Alive"):
                continue
            out.append({"total": dict(node.get("Resources") or {}),
                        "available": available.get(node["NodeID"], {})})
        return out

    def availability(self, hardware: Hardware) -> str:
        """Together's `available` (a replica fits on a node now), `insufficient` (a node
        could hold one, but its resources are taken) or `unavailable` (no node can)."""
        nodes = self.nodes()
        if hardware.spans_nodes:  # its GPUs may come from several nodes
            nodes = [{"total": _summed(n["total"] for n in nodes),
                      "available": _summed(n["available"] for n in nodes)}]
        if any(_fits(hardware, n["available"]) for n in nodes):
            return "available"
        if any(_fits(hardware, n["total"]) for n in nodes):
            return "insufficient"
        return "unavailable"

    def shutdown(self) -> None:
        import ray

        ray.shutdown()


def _summed(resources) -> dict[str, float]:
    total: dict[str, float] = {}
    for r in resources:
        for key, value in r.items():
            total[key] = total.get(key, 0.0) + value
    return total


def _fits(hardware: Hardware, resources: dict[str, float]) -> bool:
    if resources.get("CPU", 0.0) + 1e-9 < hardware.num_cpus:
        return False
    if resources.get("GPU", 0.0) + 1e-9 < hardware.num_gpus:
        return False
    if hardware.accelerator_type and \
            f"accelerator_type:{hardware.accelerator_type}" not in resources:
        return False
    if hardware.memory_gb and resources.get("memory", 0.0) < hardware.memory_gb * (1 << 30):
        return False
    return True


def _available_by_node() -> dict[str, dict[str, float]]:
    """Per node's free resources (Ray's state API), {} where it cannot say."""
    try:
        from ray._private.state import available_resources_per_node

        return {node_id: dict(resources)
                for node_id, resources in available_resources_per_node().items()}
    except Exception:  # an internal API: fall back to the cluster's sum on one node
        import ray

        nodes = [n for n in ray.nodes() if n.get("Alive")]
        if len(nodes) == 1:
            return {nodes[0]["NodeID"]: dict(ray.available_resources())}
        return {}
