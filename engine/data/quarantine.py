"""The quarantine list: unreadable files of a data root that the loaders skip.

`unigendet data check ROOT` (engine/data/check.py) decodes every image of ROOT and writes the files
that fail into a list; `scan_folder` drops the listed files. A bad file that is not listed stops the
loader with a `DataError` naming it. The list never changes the data itself: files are only skipped,
and a listed file stays skipped until the next `data check` (run it again after fixing files).

Format: UTF-8 text, tab-separated, one header line, then one line per file sorted by path:

    path<TAB>reason<TAB>detail
    fake/sd/0007.png<TAB>truncated<TAB>image file is truncated (150 bytes not processed)

`path` is relative to the data root with `/` separators; `reason` is one of `REASONS`; `detail` is
the decoder's message. Backslash, tab, CR and newline inside a field are written as `\\\\`, `\\t`,
`\\r`, `\\n` (the usual escaped-TSV convention), so any file name survives the round trip.

Default location: `ROOT/.unigendet_quarantine.tsv` (hidden, not an image extension, beside real/ and
fake/, so no scan ever picks it up as an image); `data.quarantine` / `--out` put it elsewhere.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from .batch import DataError

QUARANTINE_NAME = ".unigendet_quarantine.tsv"
HEADER = ("path", "reason", "detail")

# Why a file is unreadable (the order is the order of `data check`'s summary).
REASONS = ("empty", "truncated", "not_an_image", "unsupported_format", "decompression_bomb", "corrupt")

_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_UNESCAPES = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}


@dataclass(frozen=True)
class BadFile:
    """One quarantined file."""

    path: str  # relative to the data root, "/" separators
    reason: str  # one of REASONS
    detail: str  # the decoder's message, one line


def default_quarantine_path(root: str | os.PathLike) -> str:
    """Where `data check` writes the list of `root` and where the loaders look for it by default."""
    return os.path.join(os.fspath(root), QUARANTINE_NAME)


def resolve_quarantine(root: str | os.PathLike, quarantine: str | os.PathLike | None) -> str | None:
    """The list the loaders of `root` use: `quarantine` = "" -> the default file if it exists;
    a path -> that file, which must exist; None -> no list (every file is read)."""
    if quarantine is None:
        return None
    quarantine = os.fspath(quarantine)
    if quarantine == "":
        default = default_quarantine_path(root)
        return default if os.path.isfile(default) else None
    if not os.path.isfile(quarantine):
        raise DataError(
            f"{quarantine}: quarantine list not found (data.quarantine); write it with "
            f"`unigendet data check {os.fspath(root)} --out {quarantine}`, or set data.quarantine = '' "
            "to use the default list of the data root"
        )
    return quarantine


def _escape(field: str) -> str:
    return "".join(_ESCAPES.get(ch, ch) for ch in field)


def _unescape(field: str, where: str) -> str:
    out, chars = [], iter(field)
    for ch in chars:
        if ch == "\\":
            code = next(chars, "")
            if code not in _UNESCAPES:
                raise DataError(f"{where}: bad escape '\\{code}' (expected \\\\, \\t, \\n or \\r)")
            ch = _UNESCAPES[code]
        out.append(ch)
    return "".join(out)


def is_quarantine_list(path: str | os.PathLike) -> bool:
    """True when `path` is a file whose first line is the quarantine header (so we may overwrite it)."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().rstrip("\r\n") == "\t".join(HEADER)
    except (OSError, UnicodeDecodeError):
        return False


def write_quarantine(path: str | os.PathLike, bad: list[BadFile]) -> None:
    """Write the list atomically (a temporary file beside it, then a rename), rows sorted by path."""
    path = os.fspath(path)
    lines = ["\t".join(HEADER)]
    for entry in sorted(bad, key=lambda b: b.path):
        lines.append("\t".join(_escape(field) for field in (entry.path, entry.reason, entry.detail)))
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, path)  # readers never see a half-written list
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_quarantine(path: str | os.PathLike) -> list[BadFile]:
    """Parse a list written by `write_quarantine`; `DataError` names the file and line when it is bad."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read quarantine list ({exc})") from None
    if not lines or lines[0] != "\t".join(HEADER):
        raise DataError(f"{path}: not a quarantine list (first line must be 'path<TAB>reason<TAB>detail')")
    out = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        fields = line.split("\t")
        if len(fields) != 3:
            raise DataError(f"{where}: expected 3 tab-separated fields (path, reason, detail), got {len(fields)}")
        rel, reason, detail = (_unescape(field, where) for field in fields)
        if reason not in REASONS:
            raise DataError(f"{where}: unknown reason {reason!r} (expected one of {', '.join(REASONS)})")
        if not rel or os.path.isabs(rel):
            raise DataError(f"{where}: path must be relative to the data root, got {rel!r}")
        out.append(BadFile(rel, reason, detail))
    return out


def quarantined_paths(path: str | os.PathLike) -> set[str]:
    """The listed paths, relative to the data root, normalised with this system's separator."""
    return {os.path.normpath(entry.path.replace("/", os.sep)) for entry in read_quarantine(path)}
