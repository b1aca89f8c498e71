#!/usr/bin/env python3
"""The Debian mirrors the host's apt already uses, for scripts/setup-host.sh and
workspace_images/build.sh. Standard library only: it runs with the system python3.

Reads the enabled "Types: deb" stanzas of /etc/apt/sources.list.d/*.sources (deb822) and the
one-line "deb URI suite ..." entries of /etc/apt/sources.list and sources.list.d/*.list; only
http(s) URIs count.

Usage: apt_sources.py [--root DIR] mirror
           The mirror for the host's own suite (VERSION_CODENAME of /etc/os-release, bookworm
           when unknown), else the first one that is not a -security archive.
       apt_sources.py [--root DIR] image-vars SUITE
           Shell assignments: MIRROR (DEN_DEBIAN_MIRROR, else the mirror for SUITE),
           MIRROR_SUITES (SUITE, and SUITE-updates where that mirror has it) and SECURITY_MIRROR
           (DEN_DEBIAN_SECURITY_MIRROR when set, even empty, else the SUITE-security mirror or
           empty).
--root DIR reads DIR/etc/... instead of /etc/... (for testing).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shlex
import sys


def codename(root: str) -> str:
    try:
        with open(os.path.join(root, "etc/os-release")) as f:
            for line in f:
                if line.startswith("VERSION_CODENAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return "bookworm"


def entries(root: str) -> list[tuple[str, list[str]]]:
    """(uri without trailing slashes, suites) of every enabled http(s) "deb" source."""
    apt = os.path.join(root, "etc/apt")
    found: list[tuple[str, list[str]]] = []
    for path in sorted(glob.glob(os.path.join(apt, "sources.list.d/*.sources"))):
        with open(path) as f:
            text = f.read()
        for stanza in re.split(r"\n\s*\n", text):
            fields: dict[str, str] = {}
            key = None
            for line in stanza.splitlines():
                if line.startswith("#") or not line.strip():
                    continue
                if line[0].isspace() and key:
                    fields[key] += " " + line.strip()
                    continue
                key, _, value = line.partition(":")
                key = key.strip().lower()
                fields[key] = value.strip()
            if "deb" not in fields.get("types", "").split():
                continue
            if fields.get("enabled", "yes").lower() == "no":
                continue
            for uri in fields.get("uris", "").split():
                found.append((uri.rstrip("/"), fields.get("suites", "").split()))
    lists = [os.path.join(apt, "sources.list")]
    lists += sorted(glob.glob(os.path.join(apt, "sources.list.d/*.list")))
    for path in lists:
        try:
            with open(path) as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        for line in lines:
            words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
            if len(words) >= 3 and words[0] == "deb":
                found.append((words[1].rstrip("/"), [words[2]]))
    return [(u, s) for u, s in found if re.match(r"https?://", u)]


def host_mirror(root: str) -> str:
    usable = entries(root)
    want = codename(root)
    for uri, suites in usable:
        if want in suites:
            return uri
    for uri, suites in usable:
        if not any(s.endswith("-security") for s in suites):
            return uri
    sys.exit("no http(s) Debian mirror found in the apt sources; set DEN_DEBIAN_MIRROR")


def image_vars(root: str, want: str) -> str:
    usable = entries(root)
    mirror = os.environ.get("DEN_DEBIAN_MIRROR", "").rstrip("/")
    if mirror:
        suites = {s for u, ss in usable if u == mirror for s in ss} or {want + "-updates"}
    else:
        for uri, ss in usable:
            if want in ss:
                mirror, suites = uri, set(ss)
                break
        else:
            sys.exit(f"images: no http(s) Debian mirror for {want} in the apt sources; "
                     "set DEN_DEBIAN_MIRROR")
    mirror_suites = [want] + [s for s in (want + "-updates",) if s in suites]
    if "DEN_DEBIAN_SECURITY_MIRROR" in os.environ:
        security = os.environ["DEN_DEBIAN_SECURITY_MIRROR"].rstrip("/")
    else:
        security = next((u for u, ss in usable if want + "-security" in ss), "")
    return "\n".join([
        f"MIRROR={shlex.quote(mirror)}",
        f"MIRROR_SUITES={shlex.quote(' '.join(mirror_suites))}",
        f"SECURITY_MIRROR={shlex.quote(security)}",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description="The Debian mirrors in the host's apt sources.")
    ap.add_argument("--root", default="/", help="read DIR/etc instead of /etc (testing)")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("mirror", help="the mirror for the host's own suite")
    iv = sub.add_parser("image-vars", help="MIRROR, MIRROR_SUITES, SECURITY_MIRROR for SUITE")
    iv.add_argument("suite")
    args = ap.parse_args()
    if args.command == "mirror":
        print(host_mirror(args.root))
    else:
        print(image_vars(args.root, args.suite))


if __name__ == "__main__":
    main()
