"""``COALMINE_STATE_URL`` for PostgreSQL: recognised, checked, shown without its password, and
checked by libpq.

Nothing here connects, and psycopg is imported only to check a PostgreSQL URL, so that
settings and the SQLite path never pay for the driver's import.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(url: str) -> bool:
    """Whether ``url`` names a PostgreSQL database."""
    return url.startswith(SCHEMES)


def redact(url: str) -> str:
    """``url`` without its password (in the authority or as a ``password=`` parameter)."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}@{hostport}" if user else hostport
    query = urlencode(
        [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "password"]
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def secrets(url: str) -> list[str]:
    """Every password ``url`` carries, so that messages can be scrubbed of it."""
    parts = urlsplit(url)
    found = [parts.password] if parts.password else []
    found += [v for k, v in parse_qsl(parts.query) if k == "password" and v]
    return found


def scrub(message: str, url: str) -> str:
    """``message`` with every password of ``url`` replaced by ``***``."""
    for secret in secrets(url):
        message = message.replace(secret, "***")
    return message


def postgres_url_problem(url: str) -> str | None:
    """What libpq finds wrong with ``url`` (without connecting), or None."""
    # imported here: only a PostgreSQL URL pays for the driver's import
    from psycopg import Error  # noqa: PLC0415
    from psycopg.conninfo import conninfo_to_dict  # noqa: PLC0415

    try:
        params = conninfo_to_dict(url)
    except Error as exc:
        return scrub(str(exc).strip(), url) or "malformed"
    if not params.get("dbname"):
        return "name the database, e.g. postgresql://coalmine@db.internal:5432/coalmine"
    return None
