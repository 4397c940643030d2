"""What `unigendet detect` reads: its arguments expanded into a list of image paths.

An argument is
- a folder: every image file under it, recursively (sorted; hidden files and folders skipped, links
  followed without ever looping), recognised by `unigendet.data.IMAGE_EXTENSIONS` (any letter case);
- a glob (`*`, `?`, `[` in a path that does not exist as given; `**` spans folders): the image files
  it matches, and the images under the folders it matches;
- `@LIST` (or `--from-file LIST`, `-` = standard input): a text file of paths, one a line (blank
  lines skipped), each a file or a folder; relative paths are relative to the current folder, as on
  the command line;
- anything else: a file, read whatever its extension (it was named on purpose).

Nothing is read here but folder listings and lists: a file that cannot be read becomes an error row
of the run later. A glob that matches nothing and a folder without images become error rows too
(`Inputs.problems`), so that one bad argument never stops a long run. Only an unreadable list stops
before the run (`DataError`): without it the run would not know what to read.
"""
from __future__ import annotations

import glob
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..data import IMAGE_EXTENSIONS, DataError

GLOB_CHARACTERS = ("*", "?", "[")


@dataclass
class Inputs:
    """The paths to score, in order (each once), and the problems found while expanding."""

    paths: list[str] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (argument, one-line reason)
    skipped: int = 0  # files under a folder or matched by a glob that are not images
    _seen: set[str] = field(default_factory=set, repr=False)

    def add(self, path: str) -> None:
        key = os.path.normpath(path)
        if key not in self._seen:
            self._seen.add(key)
            self.paths.append(path)


def is_image_name(name: str) -> bool:
    """True when `name` ends with one of `IMAGE_EXTENSIONS` (any letter case)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def images_under(folder: str) -> tuple[list[str], int, list[str]]:
    """(sorted image paths under `folder`, joined to it; count of other files; one line per folder
    that could not be listed), recursively.

    Hidden names (leading '.') are left out, as the dataset scans do; a folder reached twice
    through symlinks is listed once."""
    found, others, seen, unlisted = [], 0, set(), []

    def report(e: OSError) -> None:
        unlisted.append(f"{e.filename}: cannot list this folder ({e.strerror or e})")

    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True, onerror=report):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink cycle or a second link to one folder: do not list it twice
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith("."):
                continue
            if is_image_name(name):
                found.append(os.path.join(dirpath, name))
            else:
                others += 1
    return sorted(found), others, unlisted


def read_list(source: str) -> list[str]:
    """The paths of a list file (`-` = standard input): one a line, line endings and blank lines dropped."""
    try:
        if source == "-":
            text = sys.stdin.read()
        else:
            with open(source, encoding="utf-8", errors="surrogateescape") as f:  # any bytes name a file
                text = f.read()
    except OSError as e:
        raise DataError(f"{source}: cannot read the list of files ({e.strerror or e})") from None
    return [line.rstrip("\r") for line in text.split("\n") if line.strip()]


def _add_folder(inputs: Inputs, folder: str, argument: str) -> None:
    found, others, unlisted = images_under(folder)
    inputs.skipped += others
    inputs.problems += [(argument, line) for line in unlisted]
    if not found and not unlisted:
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        inputs.problems.append((argument, f"{argument}: no image files under this folder ({exts})"))
    for path in found:
        inputs.add(path)


def _add_path(inputs: Inputs, path: str) -> None:
    if os.path.isdir(path):
        _add_folder(inputs, path, path)
    else:
        inputs.add(path)  # read later; a missing or unreadable file becomes its error row


def _add_glob(inputs: Inputs, pattern: str) -> None:
    matches = sorted(glob.glob(pattern, recursive=True))
    images = 0
    for match in matches:
        if os.path.isdir(match):
            before = len(inputs.paths)
            found, others, unlisted = images_under(match)
            inputs.skipped += others
            inputs.problems += [(match, line) for line in unlisted]
            for path in found:
                inputs.add(path)
            images += len(inputs.paths) - before
        elif is_image_name(match):
            inputs.add(match)
            images += 1
        else:
            inputs.skipped += 1
    if not matches:
        inputs.problems.append((pattern, f"{pattern}: no file matches this pattern"))
    elif not images:
        inputs.problems.append((pattern, f"{pattern}: matches {len(matches)} path(s), none of them an image file"))


def expand_inputs(arguments: Iterable[str], lists: Iterable[str] = ()) -> Inputs:
    """Expand command-line `arguments` (files, folders, globs, @LIST) and `lists` (--from-file) in order."""
    inputs = Inputs()
    for argument in arguments:
        if argument.startswith("@") and len(argument) > 1 and not os.path.exists(argument):
            for path in read_list(argument[1:]):
                _add_path(inputs, path)
        elif not os.path.lexists(argument) and any(c in argument for c in GLOB_CHARACTERS):
            _add_glob(inputs, argument)
        else:
            _add_path(inputs, argument)
    for source in lists:
        for path in read_list(source):
            _add_path(inputs, path)
    return inputs
