"""The one place secrets are taken out of text the proxy shows, logs, stores or writes.

Secrets are `KEY`, `API_KEY`, the OpenClaw gateway's token, and what a backend `URL` may
carry: its user info (`http://user:password@host`) and the values of key-like query
parameters (`?api_key=...`, `token`, `sig`, `code`, ...). A backend may echo a secret in
another form than the one it was given, so each is also looked for as JSON escapes it
(`\\/`, `\\"`, `\\\\`, `\\uXXXX`), percent-encoded, and in base64 wherever it sits in a longer
base64 text (`Basic dXNlcjpTRUtSRVQ=`). Pure: no I/O.
"""

from __future__ import annotations

import base64
import functools
import json
import re
from collections.abc import Iterable
from urllib.parse import parse_qsl, quote, quote_plus, unquote, unquote_plus, urlsplit, urlunsplit

MASK = "****"
_KEYLIKE = re.compile(
    r"(?i)(key|token|secret|pass|pwd|pw|auth|sig|credential|session|code)"
)  # (signature, access_token, password: all contain one of these)
_USERINFO = re.compile(r"//([^/?#]*)@")
MIN_SECRET = 4  # shorter strings would mask ordinary text; such a secret is no secret
MIN_BASE64 = 8  # base64 forms shorter than this would mask ordinary words
_PERCENT_ESCAPE = re.compile(r"%[0-9A-F]{2}")


def url_secrets(url: str | None) -> list[str]:
    """The secret parts of a URL: user name and password, key-like query values (both as
    written in the URL and decoded)."""
    if not url:
        return []
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError on a bad port)
    except ValueError:  # not a URL a client could use; whatever is before an @ is secret
        userinfo = _USERINFO.search(url)
        return [userinfo.group(1)] if userinfo else []
    found = [s for s in (parts.username, parts.password) if s]
    for pair in parts.query.split("&"):
        name, _, value = pair.partition("=")
        if value and _KEYLIKE.search(unquote_plus(name)):
            found += [value, unquote(value), unquote_plus(value)]
    return list(dict.fromkeys(found))


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


def encodings(secret: str) -> set[str]:
    """The forms `secret` may take in text another program made of it."""
    forms = {secret}
    for ascii_only in (True, False):  # JSON, as JavaScript and PHP (`\\/`) write it
        escaped = json.dumps(secret, ensure_ascii=ascii_only)[1:-1]
        forms |= {escaped, escaped.replace("/", "\\/")}
    units = secret.encode("utf-16-be", "surrogatepass")  # every character as \\uXXXX
    every = "".join(f"\\u{units[i]:02x}{units[i + 1]:02x}" for i in range(0, len(units), 2))
    forms |= {every, every.upper().replace("\\U", "\\u")}
    for encoded in (quote(secret, safe=""), quote_plus(secret, safe="")):
        forms |= {encoded, _PERCENT_ESCAPE.sub(lambda m: m.group().lower(), encoded)}
    raw = secret.encode("utf-8", "surrogatepass")
    for shift in range(3):  # the secret's bytes at each place within base64's 3-byte groups
        coded = base64.b64encode(b"\0" * shift + raw + b"\0\0").decode()
        first, last = -(-8 * shift // 6), (8 * (shift + len(raw))) // 6
        middle = coded[first:last]
        if len(middle) >= MIN_BASE64:
            forms |= {middle, middle.replace("+", "-").replace("/", "_")}
    return {f for f in forms if len(f) >= MIN_SECRET}


class Redactor:
    """Replaces every known secret, in every form `encodings` knows, by ****."""

    def __init__(self, secrets: Iterable[str | None]) -> None:
        forms: set[str] = set()
        for secret in secrets:
            if secret and len(secret) >= MIN_SECRET:
                forms |= encodings(secret)
        # Longest first: a form that contains another is masked whole.
        self._secrets = sorted(forms, key=len, reverse=True)
        self._bytes = [s.encode("utf-8", "surrogatepass") for s in self._secrets]

    @classmethod
    @functools.lru_cache(maxsize=16)
    def for_secrets(cls, *secrets: str | None) -> Redactor:
        return cls(secrets)

    @classmethod
    def for_settings(
        cls, key: str | None, api_key: str | None, url: str | None, *more: str | None
    ) -> Redactor:
        return cls.for_secrets(key, api_key, *url_secrets(url), *more)

    def in_bytes(self, data: bytes) -> bytes:
        """The same on bytes as they are sent (UTF-8), for data passed on as it came."""
        for raw in self._bytes:
            if raw in data:
                data = data.replace(raw, MASK.encode())
        return data

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return text
