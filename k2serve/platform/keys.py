"""API keys: made once, shown once, stored only as a SHA-256 hash.

A key reads `k2s-<id>-<secret>`: `id` is 12 hex characters, public (it names the key in the
ledger and in logs), `secret` is 32 random bytes (URL-safe base64). The database keeps the
id, a display prefix (`k2s-<id>-…`) and SHA-256(key); a presented key is looked up by its id
and its hash compared with `hmac.compare_digest`. The stored hash is never accepted as a
credential (it is not a key), and no code path logs a presented key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import dataclass

from sqlalchemy import select

from k2serve.platform.db import Database
from k2serve.platform.models import ApiKey

KEY_PREFIX = "k2s"
_ID_RE = re.compile(r"^[0-9a-f]{12}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:+-]{0,127}$")
_DUMMY_HASH = hashlib.sha256(b"no such key").hexdigest()


class KeyAdminError(ValueError):
    """A key operation the user asked for cannot be done (name taken, no such key...)."""


@dataclass(frozen=True)
class KeyInfo:
    """What a request needs to know about its key (never the hash)."""

    id: str
    name: str
    is_admin: bool
    rpm_limit: int | None
    tpm_limit: int | None
    allowed_models: tuple[str, ...] | None
    budget_usd: float | None
    spent_usd: float
    created_at: float
    revoked_at: float | None
    last_used_at: float | None
    prefix: str

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    @property
    def has_limits(self) -> bool:
        return bool(self.rpm_limit) or bool(self.tpm_limit)

    def allows_model(self, model: str) -> bool:
        return self.allowed_models is None or model in self.allowed_models

    def as_dict(self) -> dict:
        return {"id": self.id, "name": self.name, "prefix": self.prefix,
                "admin": self.is_admin, "rpm": self.rpm_limit, "tpm": self.tpm_limit,
                "models": list(self.allowed_models) if self.allowed_models is not None else None,
                "budget_usd": self.budget_usd, "spent_usd": self.spent_usd,
                "created_at": self.created_at, "revoked_at": self.revoked_at,
                "last_used_at": self.last_used_at,
                "status": "revoked" if self.revoked else "active"}


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def split_key(key: str) -> str | None:
    """The public id of a well-formed key, else None."""
    parts = key.split("-", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or not _ID_RE.match(parts[1]) or not parts[2]:
        return None
    return parts[1]


def _info(row: ApiKey) -> KeyInfo:
    models = tuple(json.loads(row.allowed_models)) if row.allowed_models else None
    return KeyInfo(id=row.id, name=row.name, is_admin=bool(row.is_admin),
                   rpm_limit=row.rpm_limit, tpm_limit=row.tpm_limit, allowed_models=models,
                   budget_usd=row.budget_usd, spent_usd=row.spent_usd or 0.0,
                   created_at=row.created_at, revoked_at=row.revoked_at,
                   last_used_at=row.last_used_at, prefix=row.prefix)


class KeyStore:
    def __init__(self, db: Database):
        self.db = db
        self._any_key_seen = False

    # -- administration (CLI) ----------------------------------------------------------
    def create(self, name: str, *, rpm: int | None = None, tpm: int | None = None,
               models: list[str] | None = None, budget_usd: float | None = None,
               admin: bool = False) -> tuple[KeyInfo, str]:
        """Store a new key; return its info and the key itself (the only time it exists)."""
        if not _NAME_RE.match(name):
            raise KeyAdminError("a key name is 1-128 characters: letters, digits and . _ @ : + -, "
                            "starting with a letter or digit")
        for label, value in (("rpm", rpm), ("tpm", tpm)):
            if value is not None and value < 1:
                raise KeyAdminError(f"--{label} must be at least 1")
        if budget_usd is not None and budget_usd < 0:
            raise KeyAdminError("--budget must not be negative")
        if models is not None:
            models = [m.strip() for m in models if m.strip()]
            if not models:
                raise KeyAdminError("--models needs at least one model id")
        with self.db.write() as session:
            if session.scalar(select(ApiKey.id).where(ApiKey.name == name)) is not None:
                raise KeyAdminError(f"a key named {name!r} already exists (names are never reused, "
                                f"revoked keys included)")
            key_id = secrets.token_hex(6)
            while session.get(ApiKey, key_id) is not None:  # 48 bits: practically never
                key_id = secrets.token_hex(6)
            key = f"{KEY_PREFIX}-{key_id}-{secrets.token_urlsafe(32)}"
            row = ApiKey(id=key_id, name=name, key_hash=hash_key(key),
                         prefix=f"{KEY_PREFIX}-{key_id}-…", is_admin=admin, rpm_limit=rpm,
                         tpm_limit=tpm, allowed_models=json.dumps(models) if models else None,
                         budget_usd=budget_usd, spent_usd=0.0, created_at=time.time())
            session.add(row)
        return _info(row), key

    def list(self) -> list[KeyInfo]:
        with self.db.session() as session:
            rows = session.scalars(select(ApiKey).order_by(ApiKey.created_at)).all()
            return [_info(r) for r in rows]

    def get(self, key_id: str) -> KeyInfo | None:
        with self.db.session() as session:
            row = session.get(ApiKey, key_id)
            return _info(row) if row is not None else None

    def get_by_name(self, name: str) -> KeyInfo | None:
        with self.db.session() as session:
            row = session.scalar(select(ApiKey).where(ApiKey.name == name))
            return _info(row) if row is not None else None

    def revoke(self, name: str) -> KeyInfo:
        with self.db.write() as session:
            row = session.scalar(select(ApiKey).where(ApiKey.name == name))
            if row is None:
                raise KeyAdminError(f"no key named {name!r}")
            if row.revoked_at is None:
                row.revoked_at = time.time()
            return _info(row)

    # -- request path ------------------------------------------------------------------
    def lookup(self, presented: str) -> KeyInfo | None:
        """The key a request presented, or None when it matches no stored key.

        Revoked keys are returned (the caller answers 401 with a message that says so)."""
        key_id = split_key(presented)
        digest = hash_key(presented)
        row = None
        if key_id is not None:
            with self.db.session() as session:
                row = session.get(ApiKey, key_id)
        stored = row.key_hash if row is not None else _DUMMY_HASH
        if not hmac.compare_digest(stored.encode(), digest.encode()) or row is None:
            return None
        return _info(row)

    def spent_usd(self, key_id: str) -> float:
        """The key's settled spend as the database has it now (budgets read it after taking
        their hold: see Platform._hold_budget)."""
        with self.db.session() as session:
            return session.scalar(select(ApiKey.spent_usd).where(ApiKey.id == key_id)) or 0.0

    def any_key_exists(self) -> bool:
        """Has any key ever been made here (revoked ones count)? Once true, stays true."""
        if self._any_key_seen:
            return True
        with self.db.session() as session:
            found = session.scalar(select(ApiKey.id).limit(1)) is not None
        self._any_key_seen = found
        return found
