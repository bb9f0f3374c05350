"""Bearer tokens and the sites each token may write to."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

# A site entry that authorises a token for every site.
ANY_SITE = "*"


def is_site_id(text: str) -> bool:
    """Return True when `text` is a site id: one or more ASCII digits."""
    # str.isdigit() alone would also accept superscripts and the digits of other scripts.
    return text.isascii() and text.isdigit()


class TokenTable:
    """Tokens mapped to the sites they may write to.

    Tokens never leave this object. Logs and the request log identify a token by its
    label: `token-N` for the N-th configured token, `unknown` for any other token and
    `none` when the request had no bearer token.
    """

    def __init__(self, tokens: Mapping[str, Iterable[str]] | None = None) -> None:
        self._sites: dict[str, frozenset[str]] = {}
        self._labels: dict[str, str] = {}
        for number, (token, sites) in enumerate((tokens or {}).items(), start=1):
            if not token:
                raise ValueError("invalid token: the token must not be empty")
            if isinstance(sites, str):
                raise TypeError(
                    f"sites of token-{number} must be a collection of site ids, not a string"
                )
            self._sites[token] = frozenset(str(site) for site in sites)
            self._labels[token] = f"token-{number}"

    def __len__(self) -> int:
        return len(self._sites)

    def label(self, token: str | None) -> str:
        if token is None:
            return "none"
        return self._labels.get(token, "unknown")

    def is_known(self, token: str | None) -> bool:
        return token is not None and token in self._sites

    def allows(self, token: str | None, site: str) -> bool:
        """Return True when `token` may write to `site`."""
        sites = self._sites.get(token) if token is not None else None
        return sites is not None and (ANY_SITE in sites or site in sites)


def bearer_token(header: str | None) -> str | None:
    """Return the token of an `Authorization: Bearer <token>` header, or None."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def parse_token_spec(text: str) -> tuple[str, frozenset[str]]:
    """Parse `TOKEN=SITE[,SITE...]` into the token and its sites.

    The split is at the last `=`, so tokens that end in base64 padding keep it.
    `*` as a site allows every site. Raises ValueError without echoing the token.
    """
    token, sep, site_list = text.strip().rpartition("=")
    sites = frozenset(site.strip() for site in site_list.split(",") if site.strip())
    if not sep or not token:
        raise ValueError("invalid token entry: expected TOKEN=SITE[,SITE...]")
    if not sites:
        raise ValueError("invalid token entry: no site after '=' (use '*' for every site)")
    bad = sorted(site for site in sites if site != ANY_SITE and not is_site_id(site))
    if bad:
        raise ValueError(
            f"invalid site id(s) {', '.join(bad)}: site ids are digits, or '*' for every site"
        )
    return token, sites


def read_tokens_file(path: str | Path) -> dict[str, frozenset[str]]:
    """Read `TOKEN=SITE[,SITE...]` lines, skipping blank lines and lines starting with #.

    A token listed twice gets the union of its sites. Raises ValueError with the line
    number of a malformed line, and OSError when the file cannot be read.
    """
    tokens: dict[str, frozenset[str]] = {}
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            token, sites = parse_token_spec(line)
        except ValueError as exc:
            raise ValueError(f"{path}, line {number}: {exc}") from None
        tokens[token] = tokens.get(token, frozenset()) | sites
    return tokens
