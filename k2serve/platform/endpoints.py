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

Requests change the rows (create, PATCH, DELETE) from the API's threads, on any server; the
manager thread deploys what the rows ask for (desired state, so a stop and a start are never
reordered). Several servers may share one database: only the holder of the `endpoints`
lease (k2serve.platform.lease) acts on the cluster, meters and bills; the others read the
rows every tick, so their registries route requests to the same applications. A holder
that dies is replaced `lease_s` after its last renewal. Its successor bills from that
renewal on, at the replicas it finds running; what the dead holder had metered since its
last bill (at most `meter_interval_s` of its replicas' time) is lost, never billed twice: a
bill is written only in a transaction that renews the writer's lease.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

from sqlalchemy import or_, select, update

from k2serve.errors import APIError, bad_request
from k2serve.platform.db import Database
from k2serve.platform.endpoint_billing import write_endpoint_usage
from k2serve.platform.keys import KeyInfo
from k2serve.platform.lease import Held, Lease
from k2serve.platform.models import EndpointRow
from k2serve.serving.dedicated_config import DedicatedConfig
from k2serve.serving.ray_backend import RayEndpointBackend
from k2serve.serving.registry import ModelRegistry, ModelSpec, Pricing

log = logging.getLogger("k2serve.endpoints")

STATES = ("PENDING", "STARTING", "STARTED", "STOPPING", "STOPPED", "ERROR")
RUNNING_STATES = ("PENDING", "STARTING", "STARTED")
TICK_S = 1.0
MAX_REPLICAS = 64
# Tokenizers loaded for endpoints, by what they were loaded from: once per process (a load
# can take seconds, on the manager thread that renews the lease).
_TOKENIZERS: dict[tuple, tuple] = {}


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
    asleep_at: float = 0.0
    attached_at: float = field(default_factory=time.time)  # requests after it are reported
    replica_seconds: float = 0.0  # metered, not yet billed
    meter_since: float = field(default_factory=time.time)
    running: int = 0  # replicas running at the last tick
    failing_since: float | None = None  # STARTED, but Serve reports no healthy replica
    applied: tuple | None = None  # what this process last asked the cluster for
    backfill_from: float | None = None  # just took the lease: bill from here at next tick


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
        self._tokenizers = _TOKENIZERS
        self._unservable: dict[str, str] = {}  # endpoint id -> why its backend cannot load
        self.lease = Lease(db, "endpoints", config.scaling.lease_s)
        self.tick_s = min(TICK_S, config.scaling.lease_s / 3)  # renewed a few times a lease
        self.is_holder = False
        self._last = time.time()  # the manager thread's last round
        self._thread = threading.Thread(target=self._run, name="k2serve-endpoints", daemon=True)

    # -- start and stop ---------------------------------------------------------------------
    def start(self) -> None:
        """Register the endpoints of the database; the thread's first round takes the lease
        if nobody holds it and deploys again those meant to run (Serve keeps an application
        that already runs as it is)."""
        self._refresh()
        self._thread.start()
        self._ops.put(True)

    def close(self) -> None:
        """The holder bills what it metered up to now and releases the lease, so another
        server takes over at its next tick; the applications keep running in the cluster."""
        self._stop.set()
        self._ops.put(None)
        self._thread.join(timeout=10)
        if not self.is_holder:
            return
        now = time.time()
        for endpoint_id, live in list(self._live.items()):
            live.replica_seconds += live.running * max(0.0, now - self._last)
            self._bill(endpoint_id)
        self.lease.release(time.time())
        self.is_holder = False

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
        with self._lock:  # before the manager thread's refresh sees the row
            with self.db.write() as session:
                session.add(row)
            self._attach(row)
        self._ops.put(True)
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
            if state == "STARTED" and row.state in ("STOPPED", "STOPPING", "ERROR"):
                changes.update(state="STARTING", error=None)
            elif state == "STOPPED" and row.state in RUNNING_STATES:
                changes["state"] = "STOPPING"
            self._set(endpoint_id, **changes)  # new limits: deployed in place
        self._ops.put(True)
        return self.as_object(self._row(endpoint_id))

    def delete(self, caller: KeyInfo | None, endpoint_id: str) -> None:
        row = self._owned(caller, endpoint_id)
        with self._lock:
            self._set(endpoint_id, deleted_at=time.time(), state="STOPPING"
                      if row.state in RUNNING_STATES else row.state)
            live = self._live.get(endpoint_id)
            if live is not None:
                live.backend.state = "DELETED"
        self._ops.put(True)

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
        if live is not None and self.is_holder:  # k2serve's own: what runs now
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
            self._ops.put(True)

    # -- the manager thread -------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                wake = self._ops.get(timeout=self.tick_s)
            except queue.Empty:
                wake = True
            if wake is None:
                break
            try:
                self._lead(time.time())
                rows = self._refresh()
                if self.is_holder:
                    for endpoint_id, live in list(self._live.items()):
                        if endpoint_id in rows:
                            self._reconcile(rows[endpoint_id], live)
                    now = time.time()
                    self._tick(now - self._last)
                    self._last = now
                else:
                    self._last = time.time()
            except Exception:
                log.exception("endpoint manager: round failed")

    def _lead(self, now: float) -> None:
        """Take or renew the lease; step down when another server holds it."""
        try:
            held = self.lease.hold(now)
        except Exception:
            self._step_down()  # cannot tell whether it is still ours: act as if not
            raise
        if held is None:
            if self.is_holder:
                log.warning("endpoint manager: another server holds the lease now")
                self._step_down()
        elif not self.is_holder:
            self._take_up(now, held)

    def _take_up(self, now: float, held: Held) -> None:
        """Act from now on: every endpoint is deployed again as its row asks, and metered
        from the previous holder's last renewal (what it metered before then and did not
        bill is lost). A gap of more than two leases means no server stood by: that time
        is not billed, as when a lone server restarts."""
        since = held.previous_renewed_at
        if since <= 0 or now - since > 2 * self.lease.ttl_s:
            since = now
        log.info("endpoint manager: took the lease (%s before)", held.previous_holder)
        with self._lock:
            for live in self._live.values():
                live.applied, live.running, live.asleep = None, 0, False
                live.replica_seconds, live.meter_since, live.backfill_from = 0.0, since, since
            self.is_holder = True
        # Deleted lately, perhaps by a holder that died before removing the application:
        # this server forgot them (as a non-holder does at once), so remove what is left.
        with self.db.session() as session:
            gone = session.scalars(select(EndpointRow.id).where(
                EndpointRow.deleted_at > now - 86400)).all()
        for endpoint_id in gone:
            if endpoint_id not in self._live and \
                    self.cluster.app_state(_app_name(endpoint_id))[0] is not None:
                self.cluster.delete(_app_name(endpoint_id))

    def _step_down(self) -> None:
        """Another server acts: what this one metered is not ours to bill any more (its
        bills would be refused anyway) and what it deployed is the new holder's."""
        with self._lock:
            self.is_holder = False
            for live in self._live.values():
                live.applied, live.asleep, live.backfill_from = None, False, None
                live.replica_seconds = 0.0

    def _refresh(self) -> dict[str, EndpointRow]:
        """Read the rows, which any server may have changed: register endpoints created
        elsewhere, follow their states; a non-holder forgets deleted ones at once (the
        holder waits for their applications to go)."""
        with self.db.session() as session:
            rows = {r.id: r for r in session.scalars(select(EndpointRow).where(or_(
                EndpointRow.deleted_at.is_(None), EndpointRow.id.in_(list(self._live)))))}
        for row in rows.values():
            with self._lock:
                live = self._live.get(row.id)
                if live is None and row.deleted_at is None and row.id not in self._unservable:
                    try:
                        self._attach(row)
                    except Exception as exc:  # a model it cannot load: the endpoint says why
                        log.error("endpoint %s cannot be served: %s", row.id, exc)
                        self._unservable[row.id] = str(exc)
                    if self.is_holder:  # a first load of a tokenizer takes seconds
                        self._lead(time.time())
                    continue
            if live is None:
                if self.is_holder and row.id in self._unservable and row.state != "ERROR":
                    self._set(row.id, state="ERROR", error=self._unservable[row.id])
                continue
            if row.deleted_at is not None:
                live.backend.state = "DELETED"
                if not self.is_holder:
                    self._forget(row)
            elif live.backend.state != "DELETED":
                live.backend.state = row.state
                self._report_activity(row, live)
        return rows

    def _report_activity(self, row: EndpointRow, live: _Live) -> None:
        """Write when this server last saw a request (now, while one runs) so the holder
        counts requests served anywhere: at most once a tick per endpoint."""
        seen = time.time() if live.backend.in_flight else live.backend.last_request_at
        if seen <= live.attached_at or seen - (row.last_request_at or 0.0) < self.tick_s:
            return
        with self.db.write() as session:
            session.execute(update(EndpointRow).where(
                EndpointRow.id == row.id, or_(EndpointRow.last_request_at.is_(None),
                                              EndpointRow.last_request_at < seen))
                .values(last_request_at=seen))

    def _forget(self, row: EndpointRow) -> None:
        with self._lock:
            self._live.pop(row.id, None)
            self.registry.unregister(row.name)
            self.registry.unregister(row.id)

    def _reconcile(self, row: EndpointRow, live: _Live) -> None:
        """Ask the cluster for what the row wants, unless this process already did."""
        if row.deleted_at is not None or row.state == "STOPPING":
            want: tuple | None = ("remove",)
        elif row.state in RUNNING_STATES:
            want = ("deploy", 0 if live.asleep else row.min_replicas, row.max_replicas)
        else:
            return  # STOPPED, or ERROR until someone starts it again
        if want == live.applied:
            return
        app = _app_name(row.id)
        if want[0] == "remove":
            self.cluster.delete(app)
            live.applied, live.asleep = want, False
            if row.deleted_at is not None:
                self._bill(row.id)
            return
        model = self.config.find_model(row.model)
        hardware = self.config.find_hardware(row.hardware)
        if model is None or hardware is None:
            self._set(row.id, state="ERROR",
                      error="its model or hardware is no longer configured")
            return
        if live.applied is None and row.state == "STARTED" and \
                self.cluster.app_state(app)[0] is None:
            self._set(row.id, state="STARTING")  # gone from the cluster: started afresh
        self.cluster.deploy(app, model, hardware, self.config.scaling, want[1], want[2])
        live.applied = want
        if row.state == "PENDING":
            self._set(row.id, state="STARTING")

    def _tick(self, dt: float) -> None:
        now = time.time()
        for endpoint_id, live in list(self._live.items()):
            row = self._row(endpoint_id)
            if row is None:
                continue
            status, replicas, message = self.cluster.app_state(_app_name(endpoint_id))
            running = replicas.get("RUNNING", 0)
            if live.backfill_from is not None:  # since the previous holder's last renewal
                live.replica_seconds += running * max(0.0, now - live.backfill_from)
                live.backfill_from = None
            else:
                live.replica_seconds += live.running * dt  # what ran since the last tick
            live.running = running
            if row.deleted_at is not None:
                if status is None:
                    self._bill(endpoint_id)
                    self._forget(row)
                continue
            if status not in ("DEPLOY_FAILED", "UNHEALTHY") or running:
                live.failing_since = None
            if row.state in ("PENDING", "STARTING"):
                if status == "RUNNING":
                    self._set(endpoint_id, state="STARTED", error=None)
                elif status in ("DEPLOY_FAILED", "UNHEALTHY"):
                    self._set(endpoint_id, state="ERROR", error=message or status)
                    live.applied = None  # a start deploys it again
            elif row.state == "STARTED" and status in ("DEPLOY_FAILED", "UNHEALTHY") and \
                    running == 0:
                # A dead replica being replaced: requests wait for the new one, as when
                # waking from zero. ERROR once a request waiting that long would give up.
                live.failing_since = live.failing_since or now
                if now - live.failing_since > self.config.scaling.start_timeout_s:
                    self._set(endpoint_id, state="ERROR", error=message or status)
                    live.applied = None
            elif row.state == "ERROR" and status == "RUNNING":  # Serve brought it back
                self._set(endpoint_id, state="STARTED", error=None)
            elif row.state == "STOPPING" and status is None:
                self._set(endpoint_id, state="STOPPED")
                self._bill(endpoint_id)
            last_request = max(live.backend.last_request_at, row.last_request_at or 0.0)
            if live.asleep and last_request > live.asleep_at:  # a request on another server
                live.asleep = False
                self._reconcile(row, live)
            if row.state == "STARTED" and row.inactive_timeout and not live.asleep and \
                    row.min_replicas > 0 and live.backend.in_flight == 0 and \
                    now - last_request > row.inactive_timeout * self.inactive_unit_s:
                live.asleep, live.asleep_at = True, now  # scale to zero; a request wakes it
                log.info("endpoint %s idle for %s min: scaling to zero", endpoint_id,
                         row.inactive_timeout)
                self._reconcile(row, live)
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
        ended = live.meter_since
        cost = write_endpoint_usage(
            self.db, endpoint_id=endpoint_id, api_key_id=row.api_key_id, hardware=hardware.id,
            started_at=since, ended_at=ended, replica_seconds=seconds,
            cents_per_minute=hardware.cents_per_minute,
            fence=lambda session: self.lease.renew_in(session, ended))
        if cost is None:  # the lease went to another server, which bills from our renewal
            log.warning("endpoint %s: %.1f replica-seconds not billed: the lease was lost",
                        endpoint_id, seconds)


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
