"""Write access: tokens (shown once, stored as SHA-256), browser sessions signed with a
per-process secret, and CSRF tokens bound to the session."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

from sqlalchemy import select

from defectlab.app.db import Database, Token

SESSION_COOKIE = "dl_session"
PRE_COOKIE = "dl_pre"
SESSION_SECONDS = 12 * 3600


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_token(db: Database, name: str = "default") -> str:
    """A new write token; only its hash is kept, so the caller must show it now."""
    token = secrets.token_urlsafe(24)
    with db.transaction() as session:
        session.add(Token(name=name[:64], token_hash=hash_token(token)))
    return token


def ensure_token(db: Database) -> str | None:
    """Create the first token when the database has none; returns it (else ``None``)."""
    with db.sessions() as session:
        if session.scalars(select(Token.id)).first() is not None:
            return None
    return create_token(db, "first start")


def token_id(db: Database, token: str) -> int | None:
    """The id of the token whose hash matches, or ``None``."""
    if not token or len(token) > 256:
        return None
    wanted = hash_token(token)
    with db.sessions() as session:
        for row_id, stored in session.execute(select(Token.id, Token.token_hash)):
            if hmac.compare_digest(stored, wanted):
                return row_id
    return None


class Signer:
    """Signs session cookies and derives CSRF tokens with a secret held in memory only
    (a restart logs everyone out, which is the safe direction)."""

    def __init__(self, secret: bytes | None = None) -> None:
        self.secret = secret or secrets.token_bytes(32)

    def _mac(self, text: str) -> str:
        return hmac.new(self.secret, text.encode("utf-8"), hashlib.sha256).hexdigest()

    def session_cookie(self, token_id: int, reviewer: str) -> str:
        expires = int(time.time()) + SESSION_SECONDS
        body = f"{token_id}.{expires}.{reviewer}"
        return f"{body}.{self._mac(body)}"

    def read_session(self, cookie: str | None) -> tuple[int, str] | None:
        """(token id, reviewer) of a valid, unexpired cookie."""
        if not cookie or cookie.count(".") < 3:
            return None
        body, mac = cookie.rsplit(".", 1)
        if not hmac.compare_digest(mac, self._mac(body)):
            return None
        token, expires, reviewer = body.split(".", 2)
        if int(expires) < time.time():
            return None
        return int(token), reviewer

    def csrf(self, cookie: str) -> str:
        return self._mac("csrf:" + cookie)

    def check_csrf(self, cookie: str | None, sent: str | None) -> bool:
        return bool(cookie and sent) and hmac.compare_digest(self.csrf(cookie or ""), sent or "")
