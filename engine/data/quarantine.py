"""The quarantine list: unreadable files of a data root that the loaders skip.

`unigendet data check ROOT` (engine/data/check.py) decodes every image of ROOT and writes the files
that fail into a list; every source's scan drops the listed files (`drop_quarantined`). A bad file
that is not listed stops the loader with a `DataError` naming it and the check command
(`check_command`). The list never changes the data itself: files are only skipped,
and a listed file stays skipped until the next `data check` (run it again after fixing files).

Format: UTF-8 text, tab-separated, one header line, then one line per file sorted by path:

    path<TAB>reason<TAB>detail
    fake/sd/0007.png<TAB>truncated<TAB>image file is truncated (150 bytes not processed)

`path` is relative to the data root with `/` separators (shard members: `SHARD.tar:MEMBER`, the
member name exactly as in the tar); `reason` is one of `REASONS`; `detail` is the decoder's message.
Backslash, tab, CR and newline inside a field are written as `\\\\`, `\\t`, `\\r`, `\\n` (the usual
escaped-TSV convention); every other control or line-breaking character (form feed, U+0085, U+2028,
...) as `\\uXXXX`, and a byte of a file name that is not UTF-8 as `\\xHH`, so the file is plain
UTF-8 text and any name a filesystem or tar can hold survives the round trip. Only "\\n" ends a line.

Default location: `ROOT/.unigendet_quarantine.tsv` (hidden, not an image extension, beside real/ and
fake/, so no scan ever picks it up as an image); `data.quarantine` / `--out` put it elsewhere.
"""
from __future__ import annotations

import os
import shlex
from dataclasses import dataclass

from .batch import DataError
from .images import open_regular
from .index import FolderIndex

QUARANTINE_NAME = ".unigendet_quarantine.tsv"
HEADER = ("path", "reason", "detail")

# Why a file is unreadable (the order is the order of `data check`'s summary).
REASONS = ("empty", "truncated", "not_an_image", "unsupported_format", "decompression_bomb", "corrupt",
           "not_a_regular_file", "too_large")

_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_UNESCAPES = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}
_HEX = frozenset("0123456789abcdefABCDEF")


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


def quarantine_key(rel: str) -> str:
    """The key of a listed path that the loaders look up: the relative name exactly as the scan made
    it (`data check` writes those), with this system's separator. Nothing else is normalised: a
    shard member `sub/../x.png` is its own name, not `x.png`."""
    return rel.replace("/", os.sep) if os.sep != "/" else rel


def _escape_char(ch: str) -> str:
    if ch in _ESCAPES:
        return _ESCAPES[ch]
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8, as os.fsdecode keeps it (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    if ch.isprintable() or ch == " ":
        return ch
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def _escape(field: str) -> str:
    return "".join(_escape_char(ch) for ch in field)


def _unescape(field: str, where: str) -> str:
    out, i, n = [], 0, len(field)
    while i < n:
        ch = field[i]
        i += 1
        if ch == "\\":
            code = field[i : i + 1]
            i += 1
            if code in _UNESCAPES:
                ch = _UNESCAPES[code]
            elif code in ("x", "u", "U"):
                width = {"x": 2, "u": 4, "U": 8}[code]
                digits = field[i : i + width]
                if len(digits) != width or not set(digits) <= _HEX:
                    raise DataError(f"{where}: bad escape '\\{code}{digits}' ({width} hex digits expected)")
                i += width
                value = int(digits, 16)
                if value > 0x10FFFF:
                    raise DataError(f"{where}: bad escape '\\{code}{digits}' (beyond U+10FFFF)")
                ch = chr(0xDC00 + value) if code == "x" and value >= 0x80 else chr(value)
            else:
                raise DataError(f"{where}: bad escape '\\{code}' (expected \\\\, \\t, \\n, \\r, \\xHH, \\uXXXX "
                                "or \\UXXXXXXXX)")
        out.append(ch)
    return "".join(out)


def is_quarantine_list(path: str | os.PathLike) -> bool:
    """True when `path` is a file whose first line is the quarantine header (so we may overwrite it)."""
    try:
        with os.fdopen(open_regular(os.fspath(path)), encoding="utf-8") as f:
            return f.readline().rstrip("\r\n") == "\t".join(HEADER)
    except (OSError, UnicodeDecodeError, DataError):
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
        with os.fdopen(open_regular(path), encoding="utf-8") as f:
            # only "\n" ends a line ("\r\n" too): splitlines() would also cut at \f, \x1c, U+2028, ...
            lines = [line[:-1] if line.endswith("\r") else line for line in f.read().split("\n")]
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
    """The keys (`quarantine_key`) of the listed paths, relative to the data root."""
    return {quarantine_key(entry.path) for entry in read_quarantine(path)}


def check_command(root: str) -> str:
    """The `data check` command line for `root`, quoted for a POSIX shell (used in messages)."""
    return f"unigendet data check {shlex.quote(root)}"


def drop_quarantined(index: FolderIndex, listed: str) -> FolderIndex:
    """`index` without the files named in the quarantine list at `listed` (paths relative to the root)."""
    bad = quarantined_paths(listed)
    # Every name in the index is os.path.join(root, rel): cutting the prefix gives rel exactly and is
    # much cheaper than os.path.relpath on a million files.
    prefix = os.path.join(index.root, "")
    keep, skipped = [], []
    for position, path in enumerate(index.files):
        if path[len(prefix):] in bad:
            skipped.append(path)
        else:
            keep.append(position)
    out = index.subset(keep)
    out.quarantine, out.skipped = listed, skipped
    if out.num_real == 0:
        raise DataError(
            f"{index.root}: all {index.num_real} real images are listed in the quarantine "
            f"list {listed}; nothing left to load"
        )
    return out
