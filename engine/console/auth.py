"""Who may act through the console, and from where.

- **Sign-in.** The operator types ADMIN_TOKEN into the console's form (`POST /login`). It is compared in constant
  time (both sides hashed first, so their lengths do not show), and the answer is a session cookie: HttpOnly,
  SameSite=Strict, path `/`, holding a random session id, when it was issued and an HMAC of both keyed by a key
  derived from ADMIN_TOKEN. Never the token itself: the cookie proves the token was typed, and a changed ADMIN_TOKEN
  ends every session. Sessions last `SESSION_SECONDS`.
- **CSRF.** Every form of a signed-in page carries the session's CSRF token (an HMAC of the session id under the
  same key), and every action checks it in constant time.
- **Origin.** Every POST (sign-in included) must come from a page of this console: its `Origin` header, or its
  `Referer` when a browser sent no Origin, must name the host and port the request was sent to (its `Host`).
  Neither header: refused. A page of another site cannot meet this, nor send the SameSite=Strict cookie.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

COOKIE = "drjobs_console"
SESSION_SECONDS = 12 * 3600
_KEY_LABEL = b"drjobs console session key v1"


@dataclass(frozen=True)
class Session:
    """A signed-in operator: `id` names the session in the audit log (a hash of its random part, not the cookie)."""

    id: str
    csrf: str


class Auth:
    """Sign-in, sessions and CSRF tokens under ADMIN_TOKEN (`token` None: nobody can sign in)."""

    def __init__(self, token: str | None, *, session_seconds: float = SESSION_SECONDS) -> None:
        self.enabled = token is not None
        self.session_seconds = session_seconds
        material = (token or secrets.token_hex(32)).encode()
        self._token_digest = hashlib.sha256(material).digest()
        self._key = hmac.new(material, _KEY_LABEL, hashlib.sha256).digest()

    def token_matches(self, submitted: str) -> bool:
        """Whether `submitted` is ADMIN_TOKEN, in constant time (never true while it is unset)."""
        digest = hashlib.sha256(submitted.encode("utf-8", "surrogatepass")).digest()
        return hmac.compare_digest(digest, self._token_digest) and self.enabled

    def new_session(self, now: float | None = None) -> str:
        """A fresh session cookie value: `<random>.<issued>.<hmac>`."""
        payload = f"{secrets.token_urlsafe(18)}.{int(now if now is not None else time.time())}"
        return f"{payload}.{self._mac('session', payload)}"

    def session(self, cookie: str | None, now: float | None = None) -> Session | None:
        """The session this cookie proves, or None (no cookie, forged, from another ADMIN_TOKEN, expired)."""
        if not self.enabled or not cookie or len(cookie) > 200:
            return None
        payload, _, mac = cookie.rpartition(".")
        nonce, _, issued = payload.partition(".")
        if not nonce or not issued.isdigit() or not hmac.compare_digest(mac, self._mac("session", payload)):
            return None
        age = (now if now is not None else time.time()) - int(issued)
        if not 0 <= age <= self.session_seconds:
            return None
        return Session(id=hashlib.sha256(nonce.encode()).hexdigest()[:8], csrf=self._mac("csrf", nonce))

    def csrf_matches(self, session: Session, submitted: str | None) -> bool:
        return bool(submitted) and hmac.compare_digest(session.csrf.encode(), (submitted or "").encode())

    def _mac(self, purpose: str, value: str) -> str:
        return hmac.new(self._key, f"{purpose}|{value}".encode(), hashlib.sha256).hexdigest()


def origin_refusal(host: str | None, origin: str | None, referer: str | None) -> str | None:
    """Why a POST is not from a page of this console (None: it is). `host` is the request's Host header."""
    if not host:
        return "the request has no Host header"
    if origin is not None:
        claimed, header = origin, "Origin"
    elif referer:
        claimed, header = referer, "Referer"
    else:
        return "the request has neither an Origin nor a Referer header, so it cannot be told from a cross-site one"
    try:
        parts = urlsplit(claimed)
    except ValueError:
        return f"its {header} header is not a URL"
    if parts.scheme not in ("http", "https") or parts.netloc.lower() != host.lower():
        shown = claimed if len(claimed) <= 100 else claimed[:100] + "…"
        return f"its {header} ({shown}) is not this console ({host}): a cross-site request"
    return None
