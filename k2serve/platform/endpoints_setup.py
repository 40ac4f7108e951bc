"""`k2serve serve --ray`: the Ray cluster, the endpoints file and the manager, put together."""

from __future__ import annotations

from k2serve.platform.endpoints import EndpointManager
from k2serve.serving.dedicated_config import read_dedicated_config
from k2serve.serving.ray_cluster import LocalClusterOptions, RayCluster, ray_available
from k2serve.serving.registry import ModelRegistry


def open_endpoints(platform, registry: ModelRegistry, *, address: str | None,
                   endpoints_file: str | None, num_cpus: float | None = None
                   ) -> EndpointManager:
    """Connect to (or start) the cluster and take up the database's endpoints. Raises
    RuntimeError or ValueError with a message a user can act on."""
    config = read_dedicated_config(endpoints_file)
    if not ray_available():
        raise RuntimeError("Ray Serve is not installed: pip install 'k2serve[ray]'")
    try:
        cluster = RayCluster(address, LocalClusterOptions(num_cpus=num_cpus))
    except Exception as exc:
        raise RuntimeError(f"cannot connect to the Ray cluster "
                           f"{address or '(local)'}: {exc}") from exc
    manager = EndpointManager(platform.db, cluster, config, registry)
    manager.start()
    return manager
