"""`k2serve endpoints ...` and `k2serve hardware`: clients of a running server's
/v1/endpoints and /v1/hardware (the server owns the Ray cluster), like Together's CLI.

The server is `--url` (default $K2SERVE_URL, else http://127.0.0.1:8000), the key `--api-key`
(default $K2SERVE_API_KEY; none in open mode).
"""

from __future__ import annotations

import argparse
import json

from k2serve.client_cli import add_client_args, call_server
from k2serve.platform.cli import print_table


def add_endpoints_parsers(sub: argparse._SubParsersAction) -> None:
    endpoints = sub.add_parser("endpoints", help="dedicated endpoints on the server's Ray "
                                                 "cluster (k2serve serve --ray)")
    esub = endpoints.add_subparsers(dest="endpoints_command", required=True)

    create = esub.add_parser("create", help="deploy a model on dedicated replicas")
    create.add_argument("--model", required=True)
    create.add_argument("--hardware", required=True, help="an id from `k2serve hardware`")
    create.add_argument("--min-replicas", type=int, default=1)
    create.add_argument("--max-replicas", type=int, default=1)
    create.add_argument("--display-name", default=None)
    create.add_argument("--inactive-timeout", type=int, default=None,
                        help="minutes without a request before it scales to zero")
    create.add_argument("--no-start", action="store_true", help="create it STOPPED")
    add_client_args(create)
    create.set_defaults(func=_create)

    listing = esub.add_parser("list", help="list endpoints")
    listing.add_argument("--mine", action="store_true")
    add_client_args(listing)
    listing.set_defaults(func=_list)

    for name, func, text in (("get", _get, "show one endpoint"),
                             ("start", _start, "start a stopped endpoint"),
                             ("stop", _stop, "stop an endpoint (its replicas go)"),
                             ("delete", _delete, "delete an endpoint")):
        p = esub.add_parser(name, help=text)
        p.add_argument("endpoint_id")
        add_client_args(p)
        p.set_defaults(func=func)

    update = esub.add_parser("update", help="change replicas, name or inactive timeout")
    update.add_argument("endpoint_id")
    update.add_argument("--min-replicas", type=int, default=None)
    update.add_argument("--max-replicas", type=int, default=None)
    update.add_argument("--display-name", default=None)
    update.add_argument("--inactive-timeout", type=int, default=None)
    add_client_args(update)
    update.set_defaults(func=_update)

    hardware = sub.add_parser("hardware", help="the hardware dedicated endpoints can use, "
                                               "with its price per minute")
    hardware.add_argument("--model", default=None,
                          help="only hardware for this model, with its availability")
    add_client_args(hardware)
    hardware.set_defaults(func=_hardware)


def _call(args, method: str, path: str, body: dict | None = None):
    reply = call_server(args, method, path, json=body)
    return reply.json() if reply.content else None


def _show(args, endpoint: dict) -> int:
    if args.json:
        print(json.dumps(endpoint, indent=2))
        return 0
    scaling = endpoint.get("autoscaling") or {}
    print(f"{endpoint['id']}  {endpoint['state']}")
    for key in ("name", "display_name", "model", "hardware", "owner", "created_at"):
        if key in endpoint:
            print(f"  {key}: {endpoint[key]}")
    if scaling:
        print(f"  replicas: {endpoint.get('replicas', '-')} running, "
              f"{scaling['min_replicas']}..{scaling['max_replicas']}")
    if endpoint.get("inactive_timeout"):
        print(f"  inactive_timeout: {endpoint['inactive_timeout']} min")
    if endpoint.get("error"):
        print(f"  error: {endpoint['error']}")
    return 0


def _create(args) -> int:
    body = {"model": args.model, "hardware": args.hardware,
            "autoscaling": {"min_replicas": args.min_replicas,
                            "max_replicas": args.max_replicas},
            "state": "STOPPED" if args.no_start else "STARTED"}
    if args.display_name is not None:
        body["display_name"] = args.display_name
    if args.inactive_timeout is not None:
        body["inactive_timeout"] = args.inactive_timeout
    return _show(args, _call(args, "POST", "/v1/endpoints", body))


def _list(args) -> int:
    data = _call(args, "GET", "/v1/endpoints" + ("?mine=true" if args.mine else ""))["data"]
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    if not data:
        print("No endpoints. Make one with `k2serve endpoints create --model M --hardware H`.")
        return 0
    rows = [("ID", "NAME", "MODEL", "STATE", "OWNER", "CREATED")]
    rows += [(e["id"], e["name"], e["model"], e["state"], e["owner"], e["created_at"])
             for e in data]
    print_table(rows)
    return 0


def _get(args) -> int:
    return _show(args, _call(args, "GET", f"/v1/endpoints/{args.endpoint_id}"))


def _start(args) -> int:
    return _show(args, _call(args, "PATCH", f"/v1/endpoints/{args.endpoint_id}",
                             {"state": "STARTED"}))


def _stop(args) -> int:
    return _show(args, _call(args, "PATCH", f"/v1/endpoints/{args.endpoint_id}",
                             {"state": "STOPPED"}))


def _update(args) -> int:
    body: dict = {}
    scaling = {k: v for k, v in (("min_replicas", args.min_replicas),
                                 ("max_replicas", args.max_replicas)) if v is not None}
    if scaling:
        body["autoscaling"] = scaling
    if args.display_name is not None:
        body["display_name"] = args.display_name
    if args.inactive_timeout is not None:
        body["inactive_timeout"] = args.inactive_timeout
    return _show(args, _call(args, "PATCH", f"/v1/endpoints/{args.endpoint_id}", body))


def _delete(args) -> int:
    _call(args, "DELETE", f"/v1/endpoints/{args.endpoint_id}")
    print(f"Deleted {args.endpoint_id}.")
    return 0


def _hardware(args) -> int:
    path = "/v1/hardware" + (f"?model={args.model}" if args.model else "")
    data = _call(args, "GET", path)["data"]
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    rows = [("ID", "GPUS", "GPU", "GPU MEMORY", "CENTS/MIN", "AVAILABILITY")]
    rows += [(h["id"], str(h["specs"]["gpu_count"]), h["specs"]["gpu_type"],
              f"{h['specs']['gpu_memory']:g} GB", f"{h['pricing']['cents_per_minute']:g}",
              (h.get("availability") or {}).get("status", "-")) for h in data]
    print_table(rows)
    return 0
