"""together 3.x's endpoint shapes (`/v2/projects/{project_id}/endpoints`) over k2serve's own.

A k2serve endpoint is one model on one hardware, so in 3.x terms it is an endpoint with
exactly one deployment, whose id is the endpoint's id and which takes all its live traffic.
k2serve has no projects: any project id is accepted and echoed back; who sees what is still
decided by the API key, as on /v1/endpoints. Pure functions: no I/O, testable without Ray.
"""

from __future__ import annotations

import hashlib

from k2serve.errors import APIError, bad_request

DEPLOYMENT_STATES = {"PENDING": "DEPLOYMENT_STATE_PROVISIONING",
                     "STARTING": "DEPLOYMENT_STATE_PROVISIONING",
                     "STARTED": "DEPLOYMENT_STATE_READY",
                     "STOPPING": "DEPLOYMENT_STATE_STOPPING",
                     "STOPPED": "DEPLOYMENT_STATE_STOPPED",
                     "ERROR": "DEPLOYMENT_STATE_FAILED"}
VISIBILITY = "VISIBILITY_PRIVATE"  # an endpoint belongs to the key that made it
# Passed through to k2serve's create/update as they are (the SDK sends them via extra_body).
K2_FIELDS = ("model", "hardware", "autoscaling", "state", "inactive_timeout")
MAX_LIMIT = 100


def etag(obj: dict) -> str:
    """Changes whenever the endpoint does (its updated_at moves on every write)."""
    return hashlib.sha256(f"{obj['id']}@{obj['updated_at']}".encode()).hexdigest()[:16]


def to_v2(obj: dict, project_id: str) -> dict:
    """A k2serve endpoint object (the detailed form) as together 3.x's Endpoint."""
    running = obj.get("replicas")
    live = obj["state"] == "STARTED"
    scaling = obj["autoscaling"]
    deployment = {
        "id": obj["id"], "name": f"{obj['name']}/{obj['id'][-8:]}",
        "model": obj["model"], "modelId": obj["model"], "hardware": obj["hardware"],
        "state": DEPLOYMENT_STATES.get(obj["state"], "DEPLOYMENT_STATE_FAILED"),
        "trafficMode": "TRAFFIC_MODE_LIVE", "createdAt": obj["created_at"],
        "autoscaling": {"minReplicas": scaling["min_replicas"],
                        "maxReplicas": scaling["max_replicas"]},
        "estimatedEffectiveTrafficShare": 1.0 if live else 0.0}
    if running is not None:
        deployment["readyReplicas"] = running
    out = {"id": obj["id"], "name": obj["name"], "projectId": project_id,
           "endpointType": "ENDPOINT_TYPE_DEDICATED", "visibility": VISIBILITY,
           "createdAt": obj["created_at"], "updatedAt": obj["updated_at"],
           "etag": etag(obj), "deployments": [deployment],
           "trafficSplit": [{"deploymentId": obj["id"], "weight": 1.0}] if live else [],
           # k2serve's own, for a client that wants the flat view
           "displayName": obj["display_name"], "state": obj["state"]}
    if obj.get("error"):
        out["error"] = obj["error"]
    return out


def _check_visibility(body: dict) -> None:
    value = body.get("visibility")
    if value is not None and value != VISIBILITY:
        raise bad_request("'visibility' must be VISIBILITY_PRIVATE: a k2serve endpoint is "
                          "seen by the key that created it (and admin keys).",
                          param="visibility")


def _display_name(value, param: str = "name") -> str:
    if not isinstance(value, str) or not value:
        raise bad_request(f"'{param}' must be a non-empty string.", param=param)
    return value.rsplit("/", 1)[-1]  # a `<project_slug>/<name>` form names the same


def create_body(body: dict) -> dict:
    """3.x create ({name, visibility} + k2serve's model/hardware/... fields) -> k2serve's."""
    _check_visibility(body)
    if "model" not in body or "hardware" not in body:
        raise bad_request("A k2serve endpoint serves one model: pass 'model' and 'hardware' "
                          "(one of GET /v1/hardware's ids) with the create, e.g. "
                          "extra_body={'model': ..., 'hardware': ...}; k2serve has no "
                          "separate deployments API.", param="model" if "model" not in body
                          else "hardware")
    out = {k: body[k] for k in K2_FIELDS if k in body}
    out["display_name"] = _display_name(body.get("name"))
    # 3.x's create has no autoscaling (a deployment's): one replica unless asked
    out.setdefault("autoscaling", {"min_replicas": 1, "max_replicas": 1})
    return out


def update_body(body: dict, endpoint_id: str, update_mask: str | None) -> dict:
    """3.x update -> k2serve's. traffic_split maps to start/stop: the only deployment takes
    all live traffic (weight > 0) or none (an empty split, or weight 0)."""
    if "trafficSplit" in body:  # the SDK's wire name
        body = {**{k: v for k, v in body.items() if k != "trafficSplit"},
                "traffic_split": body["trafficSplit"]}
    if update_mask:
        fields = {f.strip() for f in update_mask.split(",") if f.strip()}
        body = {k: v for k, v in body.items() if k in fields or _camel(k) in fields
                or k == "etag"}
    _check_visibility(body)
    out = {k: body[k] for k in K2_FIELDS if k in body and k not in ("model", "hardware")}
    if "model" in body or "hardware" in body:
        raise bad_request("An endpoint's model and hardware are fixed: create another "
                          "endpoint.", param="model" if "model" in body else "hardware")
    if "name" in body:
        out["display_name"] = _display_name(body["name"])
    if "traffic_split" in body:
        split = body["traffic_split"]
        if not isinstance(split, list) or len(split) > 1 or any(
                not isinstance(e, dict) or e.get("deploymentId", e.get("deployment_id"))
                != endpoint_id or not isinstance(e.get("weight"), (int, float))
                or isinstance(e.get("weight"), bool) or e["weight"] < 0 for e in split):
            raise bad_request(f"'traffic_split' must be empty or one entry for this "
                              f"endpoint's only deployment ('{endpoint_id}') with a weight "
                              f">= 0.", param="traffic_split")
        out["state"] = "STARTED" if split and split[0]["weight"] > 0 else "STOPPED"
    return out


def check_etag(obj: dict, given: str | None) -> None:
    if given and given != etag(obj):
        raise APIError(409, f"The endpoint '{obj['id']}' changed since it was read (etag "
                            f"'{given}' is not current '{etag(obj)}'); read it again.",
                       param="etag", code="etag_mismatch")


def page(ids: list[str], after: str | None, limit: int | None, order_by: str | None
         ) -> tuple[list[str], str | None]:
    """One page of endpoint ids (in creation order, or reversed) and the next cursor: the
    cursor is the last id given, so a page stays right when endpoints come and go."""
    if limit is None:
        limit = 50
    if limit < 1 or limit > MAX_LIMIT:
        raise bad_request(f"'limit' must be between 1 and {MAX_LIMIT}.", param="limit")
    if order_by:
        parts = order_by.split()
        if parts[0] not in ("created_at", "createdAt") or len(parts) > 2 or \
                (len(parts) == 2 and parts[1].lower() not in ("asc", "desc")):
            raise bad_request("'order_by' must be 'created_at', optionally followed by asc or "
                              "desc.", param="order_by")
        if len(parts) == 2 and parts[1].lower() == "desc":
            ids = ids[::-1]
    start = 0
    if after:
        if after not in ids:
            raise bad_request(f"Unknown cursor '{after}' (its endpoint is gone or not yours): "
                              f"list again from the start.", param="after")
        start = ids.index(after) + 1
    chunk = ids[start:start + limit]
    more = start + limit < len(ids)
    return chunk, (chunk[-1] if more and chunk else None)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


def hardware_to_v2(obj: dict) -> dict:
    """A /v1/hardware entry as 3.x's InferenceInstanceType. A CPU-only entry has gpuCount 0
    and gpuType "cpu"; the one region is the Ray cluster this server drives."""
    specs = obj["specs"]
    gpu = specs.get("gpu_type") or "cpu"
    count = int(specs.get("gpu_count") or 0)
    memory = int(specs.get("gpu_memory") or 0)
    described = f"{count}x {gpu} ({memory} GiB)" if count else "CPU only"
    return {"id": obj["id"], "name": obj["id"], "description": described, "gpuCount": count,
            "gpuMemoryGib": memory, "gpuType": gpu,
            "priceCentsPerHour": round(obj["pricing"]["cents_per_minute"] * 60),
            "regions": [{"name": "ray-cluster"}]}
