"""Class names (any text, e.g. ``창틀,문틀수정``) as MLflow keys and file names: a reversible encoding.

MLflow refuses a param, metric or tag key holding a comma (and stores keys as files on its file store), and a
file name may not hold ``/`` (``:``, ``?``, … on Windows). So wherever a name becomes a key or a file name it goes
through :func:`encode_key`, and :func:`decode_key` gives the name back::

    encode_key("창틀,문틀수정") == "-ec-b0-bd-ed-8b-80-2c-eb-ac-b8-ed-8b-80-ec-88-98-ec-a0-95"
    encode_key("member_0") == "member_0"        # plain lowercase names read as they are

Lowercase ASCII letters, digits and ``_`` stand for themselves; every other character becomes ``-`` plus two
lowercase hex digits per UTF-8 byte (percent-encoding with ``-`` for ``%``). The result holds only
``[a-z0-9_-]``: MLflow accepts it as a key on every OS, it is one path component everywhere, and two different
names never encode to names that differ only in case (macOS and Windows file systems ignore case). It holds no
``.``, so a dotted key (``train.flip_policy``) still splits into its parts. Where a mapping keyed by class names
is logged, log it as one JSON value instead (readable in the MLflow UI); this encoding is for the rest.
"""

from __future__ import annotations

import re

_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_")
_EMPTY = "-"  # a lone "-" is no escape (those carry two hex digits), so it can stand for the empty name
# Windows refuses these as file names whatever the case; escaping the first letter keeps them readable.
_WINDOWS_RESERVED = frozenset(
    {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}
)
_TOKEN = re.compile(r"-([0-9a-f]{2})|([a-z0-9_])")


def _escape(ch: str) -> str:
    # surrogatepass: a str may hold a lone surrogate (from JSON, say); it must round-trip too.
    return "".join(f"-{b:02x}" for b in ch.encode("utf-8", "surrogatepass"))


def encode_key(name: str) -> str:
    """``name`` as a valid MLflow param/metric/tag key and a safe single file name (see the module doc)."""
    if not name:
        return _EMPTY
    key = "".join(ch if ch in _PLAIN else _escape(ch) for ch in name)
    if key in _WINDOWS_RESERVED:
        key = _escape(key[0]) + key[1:]
    return key


def decode_key(key: str) -> str:
    """The name :func:`encode_key` made ``key`` from; ``ValueError`` for a string it cannot have made."""
    if key == _EMPTY:
        return ""
    out = bytearray()
    pos = 0
    while pos < len(key):
        m = _TOKEN.match(key, pos)
        if m is None:
            raise ValueError(f"{key!r} is not an encoded name (unexpected {key[pos]!r} at {pos})")
        out += bytes([int(m[1], 16)]) if m[1] else m[2].encode("ascii")
        pos = m.end()
    try:
        return out.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{key!r} is not an encoded name ({exc.reason})") from None
