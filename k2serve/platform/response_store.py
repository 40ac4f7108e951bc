"""Stored Responses API responses in the platform's database: the ResponseStore
(k2serve.api.response_store) of an app with a platform, so they outlive a restart and every
server process over the same database sees them."""

from __future__ import annotations

import json
import time

from k2serve.api.response_store import StoredResponse
from k2serve.platform.db import Database
from k2serve.platform.models import StoredResponseRow


class DatabaseResponseStore:
    def __init__(self, db: Database):
        self.db = db

    def save(self, record: StoredResponse) -> None:
        with self.db.write() as session:
            row = session.get(StoredResponseRow, record.id)
            if row is None:
                row = StoredResponseRow(id=record.id, api_key_id=record.owner,
                                        created_at=record.created_at or time.time())
                session.add(row)
            row.status = record.status
            row.updated_at = time.time()
            row.response = json.dumps(record.response, ensure_ascii=False)
            row.items = json.dumps(record.items, ensure_ascii=False)
            row.new_from = record.new_from

    def load(self, response_id: str, owner: str | None) -> StoredResponse | None:
        with self.db.session() as session:
            row = session.get(StoredResponseRow, response_id)
            if row is None or row.api_key_id != owner:
                return None
            return StoredResponse(row.id, row.api_key_id, json.loads(row.response),
                                  json.loads(row.items), row.new_from)

    def delete(self, response_id: str, owner: str | None) -> bool:
        with self.db.write() as session:
            row = session.get(StoredResponseRow, response_id)
            if row is None or row.api_key_id != owner:
                return False
            session.delete(row)
            return True
