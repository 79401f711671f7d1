#!/usr/bin/env python3
"""Prints the config.txt block of a HAT profile, for the image's /boot/firmware/config.txt.

    image/hat-config-txt.py hw/profiles/generic-2line.toml

A profile is a TOML file whose key `config_txt` is a (multi-line) string of config.txt lines,
for example `dtoverlay=...`. The block is wrapped in marker comments, under `[all]`, so that
the image stage can replace it when it runs again. Exit status 2 with a message naming the
file and the key when the profile cannot be used.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

BEGIN = "# linerec HAT profile begin: {name}"
END = "# linerec HAT profile end"


def config_txt_block(profile: Path) -> str:
    """The block for `profile`; ValueError names the file and what is wrong with it."""
    try:
        data = tomllib.loads(profile.read_text(encoding="utf-8"))
    except FileNotFoundError:
        known = sorted(p.stem for p in profile.parent.glob("*.toml"))
        raise ValueError(f"{profile}: no such HAT profile (there are: "
                         f"{', '.join(known) or 'none'})") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{profile}: cannot be read: {exc}") from None
    lines = data.get("config_txt")
    if not isinstance(lines, str) or not lines.strip():
        raise ValueError(f"{profile}: config_txt: must be a string of config.txt lines, "
                         'e.g. config_txt = """\\ndtoverlay=...\\n"""')
    body = [line.strip() for line in lines.strip().splitlines()]
    return "\n".join([BEGIN.format(name=profile.stem), "[all]", *body, END]) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        sys.stdout.write(config_txt_block(Path(argv[0])))
    except ValueError as exc:
        print(f"hat-config-txt: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
