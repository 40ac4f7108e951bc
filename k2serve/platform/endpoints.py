"""Dedicated endpoints: Together's /v1/endpoints over Ray Serve (k2serve.serving.ray_cluster).

An endpoint is a row in the platform database (what its owner asked for, the state it is
in) and, while it runs, a Ray Serve application named after its id whose replicas run its
model on its hardware. Clients send the endpoint's `name` (or its id) as the model; the
registry holds a RayEndpointBackend for each endpoint, whose `state` refuses requests while
it is not STARTED.

One manager thread reconciles the two, every TICK_S: Serve's application status moves an
endpoint STARTING -> STARTED (or ERROR with Serve's message), STOPPING -> STOPPED once the
application is gone; an endpoint idle for `inactive_timeout` minutes scales to zero (its
min replicas 0) and its next request puts its min back while it waits for a replica; the
replicas running are metered into replica-seconds, billed every `meter_interval_s`
(k2serve.platform.endpoint_billing).

Requests change the rows (create, PATCH, DELETE) from the API's threads; the Ray calls they
need run on the manager thread, in order, so a stop and a start are never reordered.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

from sqlalchemy import select

from k2serve.errors import APIError, bad_request
from k2serve.platform.db import Database
from k2serve.platform.endpoint_billing import write_endpoint_usage
from k2serve.platform.keys import KeyInfo
from k2serve.platform.models import EndpointRow
from k2serve.serving.dedicated_config import DedicatedConfig
from k2serve.serving.ray_backend import RayEndpointBackend
from k2serve.serving.registry import ModelRegistry, ModelSpec, Pricing

log = logging.getLogger("k2serve.endpoints")

STATES = ("PENDING", "STARTING", "STARTED", "STOPPING", "STOPPED", "ERROR")
RUNNING_STATES = ("PENDING", "STARTING", "STARTED")
TICK_S = 1.0
MAX_REPLICAS = 64


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds") \
        .replace("+00:00", "Z")


def _app_name(endpoint_id: str) -> str:
    return endpoint_id  # a Serve application per endpoint, named by its id


@dataclass
class _Live:
    """What the manager thread keeps of an endpoint besides its row."""

    backend: RayEndpointBackend
    asleep: bool = False  # scaled to zero after inactive_timeout
    replica_seconds: float = 0.0  # metered, not yet billed
    meter_since: float = field(default_factory=time.time)
    running: int = 0  # replicas running at the last tick
    failing_since: float | None = None  # STARTED, but Serve reports no healthy replica


class EndpointManager:
    def __init__(self, db: Database, cluster, config: DedicatedConfig,
                 registry: ModelRegistry):
        self.db = db
        self.cluster = cluster
        self.config = config
        self.registry = registry
        self.inactive_unit_s = config.scaling.inactive_unit_s  # tests: less than a minute
        self._live: dict[str, _Live] = {}
        self._ops: queue.Queue = queue.Queue()
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._tokenizers: dict[str, tuple] = {}
        self._thread = threading.Thread(target=self._run, name="k2serve-endpoints", daemon=True)

    # -- start and stop ---------------------------------------------------------------------
    def start(self) -> None:
        """Take up the endpoints of the database: those meant to run are deployed again
        (Serve keeps an application that already runs as it is)."""
        with self.db.session() as session:
            rows = session.scalars(select(EndpointRow).where(EndpointRow.deleted_at.is_(None))
                                   ).all()
        for row in rows:
            try:
                self._attach(row)
            except Exception as exc:  # a model it can no longer load: the endpoint says why
                log.error("endpoint %s cannot be served: %s", row.id, exc)
                self._set(row.id, state="ERROR", error=str(exc))
                continue
            if row.state in RUNNING_STATES:
                self._set(row.id, state="STARTING")
                self._ops.put(("deploy", row.id))
            elif row.state == "STOPPING":
                self._ops.put(("undeploy", row.id))
        self._thread.start()

    def close(self) -> None:
        """Bill what was metered; the applications keep running in the cluster (a restarted
        server takes them up again)."""
        self._stop.set()
        self._ops.put(None)
        self._thread.join(timeout=10)
        for endpoint_id in list(self._live):
            self._bill(endpoint_id)

    # -- the API's calls (any thread) -----------------------------------------------------------
    def create(self, caller: KeyInfo | None, body: dict) -> dict:
        model_id, hardware_id = body.get("model"), body.get("hardware")
        if not isinstance(model_id, str) or not model_id:
            raise bad_request("'model' is required: the model to deploy.", param="model")
        if not isinstance(hardware_id, str) or not hardware_id:
            raise bad_request("'hardware' is required: one of GET /v1/hardware's ids.",
                              param="hardware")
        if self.config.find_model(model_id) is None:
            raise bad_request(f"The model '{model_id}' cannot be deployed on a dedicated "
                              f"endpoint here; deployable: "
                              f"{', '.join(m.id for m in self.config.models)}.",
                              param="model", code="model_not_available")
        if self.config.find_hardware(hardware_id) is None:
            raise bad_request(f"Unknown hardware '{hardware_id}'; see GET /v1/hardware.",
                              param="hardware", code="invalid_hardware")
        low, high = _autoscaling(body.get("autoscaling"), required=True)
        state = body.get("state", "STARTED")
        if state not in ("STARTED", "STOPPED"):
            raise bad_request("'state' must be STARTED or STOPPED.", param="state")
        timeout = _inactive_timeout(body.get("inactive_timeout"))
        display = body.get("display_name")
        if display is not None and not isinstance(display, str):
            raise bad_request("'display_name' must be a string.", param="display_name")
        owner = caller.name if caller is not None else "local"
        now = time.time()
        endpoint_id = f"endpoint-{uuid.uuid4()}"
        row = EndpointRow(
            id=endpoint_id, name=f"{owner}/{model_id}-{endpoint_id[-8:]}",
            display_name=display or model_id, model=model_id, hardware=hardware_id,
            api_key_id=caller.id if caller is not None else None, owner=owner,
            state="PENDING" if state == "STARTED" else "STOPPED", min_replicas=low,
            max_replicas=high, inactive_timeout=timeout, created_at=now, updated_at=now)
        with self.db.write() as session:
            session.add(row)
        self._attach(row)
        if state == "STARTED":
            self._ops.put(("deploy", endpoint_id))
        return self.as_object(self._row(endpoint_id))

    def list(self, caller: KeyInfo | None, *, mine: bool = False,
             type: str | None = None) -> list[dict]:
        if type == "serverless":
            return []
        with self.db.session() as session:
            query = select(EndpointRow).where(EndpointRow.deleted_at.is_(None)) \
                .order_by(EndpointRow.created_at)
            rows = session.scalars(query).all()
        return [self.as_object(r, listing=True) for r in rows
                if self._may_see(caller, r, mine)]

    def get(self, caller: KeyInfo | None, endpoint_id: str) -> dict:
        return self.as_object(self._owned(caller, endpoint_id))

    def update(self, caller: KeyInfo | None, endpoint_id: str, body: dict) -> dict:
        row = self._owned(caller, endpoint_id)
        changes: dict = {}
        if "display_name" in body:
            if not isinstance(body["display_name"], str):
                raise bad_request("'display_name' must be a string.", param="display_name")
            changes["display_name"] = body["display_name"]
        if body.get("autoscaling") is not None:
            changes["min_replicas"], changes["max_replicas"] = _autoscaling(
                body["autoscaling"], required=False, current=(row.min_replicas,
                                                              row.max_replicas))
        if "inactive_timeout" in body:
            changes["inactive_timeout"] = _inactive_timeout(body["inactive_timeout"])
        state = body.get("state")
        if state is not None and state not in ("STARTED", "STOPPED"):
            raise bad_request("'state' must be STARTED or STOPPED.", param="state")
        with self._lock:
            op = None
            if state == "STARTED" and row.state in ("STOPPED", "STOPPING", "ERROR"):
                changes.update(state="STARTING", error=None)
                op = "deploy"
            elif state == "STOPPED" and row.state in RUNNING_STATES:
                changes["state"] = "STOPPING"
                op = "undeploy"
            elif ("min_replicas" in changes or "max_replicas" in changes) and \
                    row.state in RUNNING_STATES:
                op = "deploy"  # new limits, applied in place
            self._set(endpoint_id, **changes)
            if op is not None:
                self._ops.put((op, endpoint_id))
        return self.as_object(self._row(endpoint_id))

    def delete(self, caller: KeyInfo | None, endpoint_id: str) -> None:
        row = self._owned(caller, endpoint_id)
        with self._lock:
            self._set(endpoint_id, deleted_at=time.time(), state="STOPPING"
                      if row.state in RUNNING_STATES else row.state)
            live = self._live.get(endpoint_id)
            if live is not None:
                live.backend.state = "DELETED"
        self._ops.put(("delete", endpoint_id))

    def hardware(self, model: str | None = None) -> list[dict]:
        """GET /v1/hardware: what this cluster can place, `availability` when a model is
        named (Together's rule)."""
        if model is not None and self.config.find_model(model) is None:
            return []
        now = _iso(time.time())
        out = []
        for hw in self.config.hardware:
            status = self.cluster.availability(hw)
            if model is None and status == "unavailable":
                continue  # no node of this cluster could ever hold it
            out.append(hw.as_object(now, status if model is not None else None))
        return out

    # -- shapes ---------------------------------------------------------------------------
    def as_object(self, row: EndpointRow, listing: bool = False) -> dict:
        obj = {"object": "endpoint", "id": row.id, "name": row.name, "model": row.model,
               "type": "dedicated", "owner": row.owner, "state": row.state,
               "created_at": _iso(row.created_at)}
        if listing:
            return obj
        obj.update(updated_at=_iso(row.updated_at), display_name=row.display_name,
                   hardware=row.hardware,
                   autoscaling={"min_replicas": row.min_replicas,
                                "max_replicas": row.max_replicas},
                   inactive_timeout=row.inactive_timeout)
        live = self._live.get(row.id)
        if live is not None:  # k2serve's own: what runs now
            obj["replicas"] = live.running
        if row.error:
            obj["error"] = row.error
        return obj

    # -- rows ---------------------------------------------------------------------------------
    def _row(self, endpoint_id: str) -> EndpointRow | None:
        with self.db.session() as session:
            return session.get(EndpointRow, endpoint_id)

    def _owned(self, caller: KeyInfo | None, endpoint_id: str) -> EndpointRow:
        row = self._row(endpoint_id) if len(endpoint_id) <= 64 else None
        if row is None or row.deleted_at is not None or not self._may_see(caller, row, False):
            raise APIError(404, f"No endpoint '{endpoint_id}'.", param="endpointId",
                           code="endpoint_not_found")
        return row

    @staticmethod
    def _may_see(caller: KeyInfo | None, row: EndpointRow, mine: bool) -> bool:
        if caller is None:
            return not mine or row.api_key_id is None
        if mine or not caller.is_admin:
            return row.api_key_id == caller.id
        return True

    def _set(self, endpoint_id: str, **values) -> None:
        if not values:
            return
        with self.db.write() as session:
            row = session.get(EndpointRow, endpoint_id)
            for key, value in values.items():
                setattr(row, key, value)
            row.updated_at = time.time()
        live = self._live.get(endpoint_id)
        if live is not None and "state" in values and live.backend.state != "DELETED":
            live.backend.state = values["state"]

    def _attach(self, row: EndpointRow) -> None:
        """Register the endpoint's backend (its name and its id as model ids)."""
        from k2serve.serving.ray_backend import load_endpoint_backend

        model = self.config.find_model(row.model)
        if model is None:
            raise ValueError(f"the model {row.model} is no longer in the endpoints file")
        backend = load_endpoint_backend(row.name, model, self.cluster, _app_name(row.id),
                                        self.config.scaling, self._tokenizers)
        backend.state = row.state
        backend.state_hint = (f" (start it: PATCH /v1/endpoints/{row.id} with "
                              f"{{\"state\": \"STARTED\"}}, or `k2serve endpoints start "
                              f"{row.id}`)")
        backend.on_request = lambda: self._woken(row.id)
        spec = ModelSpec(id=row.name, type="chat", context_length=backend.context_length,
                         pricing=Pricing(input=model.price_input, output=model.price_output),
                         display_name=row.display_name,
                         organization=row.owner)
        with self._lock:
            self._live[row.id] = _Live(backend)
            self.registry.register(spec, backend)
            self.registry.alias(row.id, row.name)

    def _woken(self, endpoint_id: str) -> None:
        live = self._live.get(endpoint_id)
        if live is not None and live.asleep:
            live.asleep = False
            self._ops.put(("deploy", endpoint_id))

    # -- the manager thread -------------------------------------------------------------------
    def _run(self) -> None:
        last = time.time()
        while not self._stop.is_set():
            try:
                op = self._ops.get(timeout=TICK_S)
            except queue.Empty:
                op = False
            if op is None:
                break
            try:
                if op:
                    self._apply(*op)
                now = time.time()
                self._tick(now - last)
                last = now
            except Exception:
                log.exception("endpoint manager: %s failed", op or "tick")

    def _apply(self, op: str, endpoint_id: str) -> None:
        row = self._row(endpoint_id)
        live = self._live.get(endpoint_id)
        if row is None or live is None:
            return
        app = _app_name(endpoint_id)
        if op == "deploy":
            if row.deleted_at is not None or row.state not in RUNNING_STATES:
                return
            model = self.config.find_model(row.model)
            hardware = self.config.find_hardware(row.hardware)
            if model is None or hardware is None:
                self._set(endpoint_id, state="ERROR",
                          error="its model or hardware is no longer configured")
                return
            low = 0 if live.asleep else row.min_replicas
            self.cluster.deploy(app, model, hardware, self.config.scaling, low,
                                row.max_replicas)
            if row.state == "PENDING":
                self._set(endpoint_id, state="STARTING")
        elif op in ("undeploy", "delete"):
            self.cluster.delete(app)
            live.asleep = False
            if op == "delete":
                self._bill(endpoint_id)

    def _tick(self, dt: float) -> None:
        now = time.time()
        for endpoint_id, live in list(self._live.items()):
            row = self._row(endpoint_id)
            if row is None:
                continue
            status, replicas, message = self.cluster.app_state(_app_name(endpoint_id))
            running = replicas.get("RUNNING", 0)
            live.replica_seconds += live.running * dt  # what ran since the last tick
            live.running = running
            if row.deleted_at is not None:
                if status is None:
                    self._bill(endpoint_id)
                    with self._lock:
                        self._live.pop(endpoint_id, None)
                        self.registry.unregister(row.name)
                        self.registry.unregister(row.id)
                continue
            if status not in ("DEPLOY_FAILED", "UNHEALTHY") or running:
                live.failing_since = None
            if row.state in ("PENDING", "STARTING"):
                if status == "RUNNING":
                    self._set(endpoint_id, state="STARTED", error=None)
                elif status in ("DEPLOY_FAILED", "UNHEALTHY"):
                    self._set(endpoint_id, state="ERROR", error=message or status)
            elif row.state == "STARTED" and status in ("DEPLOY_FAILED", "UNHEALTHY") and \
                    running == 0:
                # A dead replica being replaced: requests wait for the new one, as when
                # waking from zero. ERROR once a request waiting that long would give up.
                live.failing_since = live.failing_since or now
                if now - live.failing_since > self.config.scaling.start_timeout_s:
                    self._set(endpoint_id, state="ERROR", error=message or status)
            elif row.state == "ERROR" and status == "RUNNING":  # Serve brought it back
                self._set(endpoint_id, state="STARTED", error=None)
            elif row.state == "STOPPING" and status is None:
                self._set(endpoint_id, state="STOPPED")
                self._bill(endpoint_id)
            if row.state == "STARTED" and row.inactive_timeout and not live.asleep and \
                    row.min_replicas > 0 and live.backend.in_flight == 0 and \
                    now - live.backend.last_request_at > row.inactive_timeout * \
                    self.inactive_unit_s:
                live.asleep = True  # scale to zero; the next request wakes it
                log.info("endpoint %s idle for %s min: scaling to zero", endpoint_id,
                         row.inactive_timeout)
                self._apply("deploy", endpoint_id)
            if now - live.meter_since >= self.config.scaling.meter_interval_s:
                self._bill(endpoint_id)

    def _bill(self, endpoint_id: str) -> None:
        live = self._live.get(endpoint_id)
        if live is None:
            return
        seconds, since = live.replica_seconds, live.meter_since
        live.replica_seconds, live.meter_since = 0.0, time.time()
        if seconds <= 0:
            return
        row = self._row(endpoint_id)
        hardware = self.config.find_hardware(row.hardware) if row is not None else None
        if row is None or hardware is None:
            return
        write_endpoint_usage(self.db, endpoint_id=endpoint_id, api_key_id=row.api_key_id,
                             hardware=hardware.id, started_at=since, ended_at=live.meter_since,
                             replica_seconds=seconds,
                             cents_per_minute=hardware.cents_per_minute)


def _autoscaling(value, *, required: bool, current: tuple[int, int] | None = None
                 ) -> tuple[int, int]:
    if value is None and required:
        raise bad_request("'autoscaling' is required: {\"min_replicas\": N, "
                          "\"max_replicas\": M}.", param="autoscaling")
    if not isinstance(value, dict):
        raise bad_request("'autoscaling' must be an object with min_replicas and "
                          "max_replicas.", param="autoscaling")
    low = value.get("min_replicas", current[0] if current else None)
    high = value.get("max_replicas", current[1] if current else None)
    for name, v in (("min_replicas", low), ("max_replicas", high)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise bad_request(f"'autoscaling.{name}' must be an integer >= 0.",
                              param=f"autoscaling.{name}")
    if high < 1 or high > MAX_REPLICAS:
        raise bad_request(f"'autoscaling.max_replicas' must be between 1 and {MAX_REPLICAS}.",
                          param="autoscaling.max_replicas")
    if low > high:
        raise bad_request("'autoscaling.min_replicas' must not exceed max_replicas.",
                          param="autoscaling.min_replicas")
    return low, high


def _inactive_timeout(value) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise bad_request("'inactive_timeout' must be a number of minutes >= 0 (0 or null: "
                          "never).", param="inactive_timeout")
    return value or None
