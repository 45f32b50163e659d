"""The one place secrets are taken out of text the proxy shows, logs, stores or writes.

Secrets are `KEY`, `API_KEY`, and what a backend `URL` may carry: its user info
(`http://user:password@host`) and the values of key-like query parameters
(`?api_key=...`, `token`, `sig`, ...). Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import parse_qsl, urlsplit, urlunsplit

MASK = "****"
_KEYLIKE = re.compile(r"(?i)(key|token|secret|passw|pwd|auth|sig|credential|session)")
_USERINFO = re.compile(r"//([^/?#]*)@")
MIN_SECRET = 4  # shorter strings would mask ordinary text; such a secret is no secret


def url_secrets(url: str | None) -> list[str]:
    """The secret parts of a URL: user name and password, key-like query values."""
    if not url:
        return []
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError on a bad port)
    except ValueError:  # not a URL a client could use; whatever is before an @ is secret
        userinfo = _USERINFO.search(url)
        return [userinfo.group(1)] if userinfo else []
    found = [s for s in (parts.username, parts.password) if s]
    found += [v for k, v in parse_qsl(parts.query, keep_blank_values=False) if _KEYLIKE.search(k)]
    return found


def mask_url(url: str | None) -> str:
    """The URL as it may be shown: user info and key-like query values masked."""
    if not url:
        return ""
    try:
        parts = urlsplit(url)
    except ValueError:  # a malformed URL (e.g. a bad IPv6 host) is shown without user info
        return _USERINFO.sub("//" + MASK + "@", url.split("?", 1)[0])
    netloc = parts.netloc
    if "@" in netloc:
        netloc = MASK + "@" + netloc.rsplit("@", 1)[1]
    query = "&".join(
        f"{k}={MASK if _KEYLIKE.search(k) else v}"
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


class Redactor:
    """Replaces every known secret in a text by ****."""

    def __init__(self, secrets: Iterable[str | None]) -> None:
        # Longest first: a secret that contains another is masked whole.
        self._secrets = sorted(
            {s for s in secrets if s and len(s) >= MIN_SECRET}, key=len, reverse=True
        )

    @classmethod
    def for_settings(cls, key: str | None, api_key: str | None, url: str | None) -> Redactor:
        return cls([key, api_key, *url_secrets(url)])

    def in_bytes(self, data: bytes) -> bytes:
        """The same on bytes as they are sent (UTF-8), for data passed on as it came."""
        for secret in self._secrets:
            raw = secret.encode("utf-8", "surrogatepass")
            if raw in data:
                data = data.replace(raw, MASK.encode())
        return data

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return text
