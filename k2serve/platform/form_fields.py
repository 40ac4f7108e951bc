"""The `model` field of a multipart/form-data body (the audio uploads), so the platform's
model allow-list and ledger see it as they see a JSON body's. File parts are skipped, not
copied.

It must be the field the route reads: Starlette's form keeps the LAST value of a repeated
field, and a `model` part that is a file (has a filename) is no model at all to the route."""

from __future__ import annotations

MAX_MODEL_BYTES = 256


def multipart_model(raw: bytes, content_type: str) -> str | None:
    from python_multipart.multipart import MultipartParser, parse_options_header

    kind, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        return None
    part = {"field": bytearray(), "value": bytearray(), "name": None, "file": False}
    found: list[str | None] = []

    def on_header_field(data, start, end):
        part["field"] += data[start:end]

    def on_header_value(data, start, end):
        part["value"] += data[start:end]

    def on_header_end():
        if bytes(part["field"]).strip().lower() == b"content-disposition":
            _, disposition = parse_options_header(bytes(part["value"]))
            part["name"] = disposition.get(b"name")
            part["file"] = b"filename" in disposition
        part["field"], part["value"] = bytearray(), bytearray()

    body = bytearray()

    def on_part_data(data, start, end):
        if part["name"] == b"model" and len(body) <= MAX_MODEL_BYTES:
            body.extend(data[start:end])

    def on_part_end():
        if part["name"] == b"model":  # a later one replaces it, as in the route's form
            value = bytes(body[:MAX_MODEL_BYTES]).decode("utf-8", "replace")
            found[:] = [None if part["file"] else value]
        body.clear()
        part["name"], part["file"] = None, False

    parser = MultipartParser(boundary, callbacks={
        "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_part_data": on_part_data,
        "on_part_end": on_part_end})
    try:
        parser.write(raw)
        parser.finalize()
    except Exception:  # a malformed body: the route answers it
        pass
    return found[0] if found else None
