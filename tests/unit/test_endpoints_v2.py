"""together 3.x endpoint shapes over k2serve's endpoint objects, checked against the 3.x
SDK's own models (what `client.endpoints.*` parses). The routes themselves run against a
real Ray cluster in tests/integration/test_ray_endpoints.py."""

from __future__ import annotations

import pytest

from k2serve.errors import APIError
from k2serve.platform import endpoints_v2 as v2

Endpoint = pytest.importorskip("together.types.endpoint").Endpoint
SyncCursorPagination = pytest.importorskip("together.pagination").SyncCursorPagination


def k2_object(state="STARTED", **extra):
    return {"object": "endpoint", "id": "endpoint-1234-abcdefgh", "name": "alice/m-abcdefgh",
            "model": "m", "type": "dedicated", "owner": "alice", "state": state,
            "created_at": "2026-12-05T17:00:00.000Z", "updated_at": "2026-12-05T17:01:00.000Z",
            "display_name": "smol", "hardware": "cpu_half",
            "autoscaling": {"min_replicas": 1, "max_replicas": 3}, "inactive_timeout": None,
            **extra}


@pytest.mark.parametrize("state,deployment_state,split", [
    ("PENDING", "DEPLOYMENT_STATE_PROVISIONING", 0), ("STARTED", "DEPLOYMENT_STATE_READY", 1),
    ("STOPPED", "DEPLOYMENT_STATE_STOPPED", 0), ("ERROR", "DEPLOYMENT_STATE_FAILED", 0)])
def test_an_endpoint_parses_as_the_sdks_endpoint(state, deployment_state, split):
    parsed = Endpoint.model_validate(v2.to_v2(k2_object(state, replicas=2), "proj-x"))
    assert parsed.project_id == "proj-x" and parsed.name == "alice/m-abcdefgh"
    assert parsed.endpoint_type == "ENDPOINT_TYPE_DEDICATED"
    (deployment,) = parsed.deployments
    assert deployment.state == deployment_state and deployment.api_model_id == "m"
    assert deployment.hardware == "cpu_half" and deployment.ready_replicas == 2
    assert deployment.autoscaling.max_replicas == 3
    assert len(parsed.traffic_split) == split
    assert parsed.created_at.year == 2026 and parsed.etag


def test_etag_follows_updates_and_a_stale_one_is_409():
    old, new = k2_object(), k2_object(updated_at="2026-12-05T17:02:00.000Z")
    assert v2.etag(old) != v2.etag(new)
    v2.check_etag(new, v2.etag(new))
    v2.check_etag(new, None)
    with pytest.raises(APIError) as err:
        v2.check_etag(new, v2.etag(old))
    assert err.value.status == 409 and err.value.param == "etag"


def test_create_needs_a_model_and_hardware_and_takes_the_name():
    with pytest.raises(APIError) as err:
        v2.create_body({"name": "x"})
    assert err.value.status == 400 and err.value.param == "model"
    with pytest.raises(APIError) as err:
        v2.create_body({"name": "x", "model": "m", "hardware": "h",
                        "visibility": "VISIBILITY_INTERNAL"})
    assert err.value.param == "visibility"
    body = v2.create_body({"name": "proj/smol", "model": "m", "hardware": "h",
                           "state": "STOPPED", "visibility": "VISIBILITY_PRIVATE"})
    assert body == {"model": "m", "hardware": "h", "state": "STOPPED", "display_name": "smol",
                    "autoscaling": {"min_replicas": 1, "max_replicas": 1}}


def test_update_maps_traffic_split_to_start_and_stop_and_honours_the_mask():
    eid = "endpoint-1"
    assert v2.update_body({"traffic_split": []}, eid, None) == {"state": "STOPPED"}
    assert v2.update_body({"trafficSplit": [{"deploymentId": eid, "weight": 1}]}, eid,
                          None) == {"state": "STARTED"}
    for bad in ([{"deploymentId": "other", "weight": 1}], [{"deploymentId": eid}], "x"):
        with pytest.raises(APIError) as err:
            v2.update_body({"traffic_split": bad}, eid, None)
        assert err.value.status == 400 and err.value.param == "traffic_split"
    assert v2.update_body({"name": "n", "trafficSplit": []}, eid, "name") == \
        {"display_name": "n"}
    with pytest.raises(APIError):
        v2.update_body({"model": "other"}, eid, None)


def test_cursor_pages_walk_every_id_once_in_either_order():
    ids = [f"e{i}" for i in range(7)]
    for order, expected in ((None, ids), ("created_at desc", ids[::-1])):
        seen, cursor = [], None
        while True:
            chunk, cursor = v2.page(ids, cursor, 3, order)
            seen += chunk
            if cursor is None:
                break
        assert seen == expected
    for kwargs in ({"after": "gone"}, {"limit": 0}, {"limit": 101}, {"order_by": "name"}):
        args = {"after": None, "limit": None, "order_by": None, **kwargs}
        with pytest.raises(APIError) as err:
            v2.page(ids, args["after"], args["limit"], args["order_by"])
        assert err.value.status == 400


def test_hardware_parses_as_the_sdks_instance_type():
    from together.types.endpoints.inference_instance_type import InferenceInstanceType

    gpu = InferenceInstanceType.model_validate(v2.hardware_to_v2({
        "id": "1x_nvidia_h100_80gb_sxm", "pricing": {"cents_per_minute": 6.0},
        "specs": {"gpu_type": "h100-80gb", "gpu_link": "sxm", "gpu_memory": 80,
                  "gpu_count": 1}}))
    assert (gpu.gpu_count, gpu.gpu_memory_gib, gpu.price_cents_per_hour) == (1, 80, 360)
    cpu = InferenceInstanceType.model_validate(v2.hardware_to_v2({
        "id": "cpu_half", "pricing": {"cents_per_minute": 60.0},
        "specs": {"gpu_type": None, "gpu_link": None, "gpu_memory": None, "gpu_count": 0}}))
    assert (cpu.gpu_count, cpu.gpu_type, cpu.price_cents_per_hour) == (0, "cpu", 3600)
