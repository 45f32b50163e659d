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
MIN_SECRET = 4  # shorter strings would mask ordinary text; such a secret is no secret


def url_secrets(url: str | None) -> list[str]:
    """The secret parts of a URL: user name and password, key-like query values."""
    if not url:
        return []
    parts = urlsplit(url)
    found = [s for s in (parts.username, parts.password) if s]
    found += [v for k, v in parse_qsl(parts.query, keep_blank_values=False) if _KEYLIKE.search(k)]
    return found


def mask_url(url: str | None) -> str:
    """The URL as it may be shown: user info and key-like query values masked."""
    if not url:
        return ""
    parts = urlsplit(url)
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

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return text
