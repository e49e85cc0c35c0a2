#!/usr/bin/env python3
"""Fails on a broken link between the project's Markdown files.

Usage: scripts/check-links.py [ROOT]

Reads every tracked or untracked (not ignored) `.md` file under ROOT (default: the repository),
and for each inline link `[text](target)` that is not a web address checks that the file it names
exists and, for `file#anchor` or `#anchor`, that the file has a heading with that anchor (GitHub's
rule: lowercase, punctuation dropped, spaces to dashes; repeated headings get -1, -2, ...).
Code blocks and inline code are skipped. Prints one line per broken link with file and line.
"""
import os
import re
import subprocess
import sys

LINK = re.compile(r"(?<!!)\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def markdown_files(root):
    try:
        out = subprocess.check_output(
            ["git", "-C", root, "ls-files", "--cached", "--others", "--exclude-standard", "*.md"], text=True
        )
        return [os.path.join(root, p) for p in out.split()]
    except (OSError, subprocess.CalledProcessError):
        found = []
        for dirpath, dirs, names in os.walk(root):
            dirs[:] = [d for d in dirs if d not in ("target", ".git")]
            found += [os.path.join(dirpath, n) for n in names if n.endswith(".md")]
        return found


def slug(heading):
    heading = re.sub(r"`([^`]*)`", r"\1", heading.strip())
    heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    heading = heading.lower()
    heading = re.sub(r"[^\w\- ]", "", heading)
    return heading.replace(" ", "-")


def prose_lines(text):
    """(line number, line) outside fenced code blocks, with inline code blanked."""
    fenced = False
    for n, line in enumerate(text.split("\n"), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            yield n, re.sub(r"`[^`]*`", "``", line)


def anchors(path, cache={}):
    if path not in cache:
        seen, found = {}, set()
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for _, line in prose_lines(text):
            m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
            if not m:
                continue
            # Inline code was blanked for the link scan; a heading's anchor keeps its text.
            s = slug(m.group(1))
            n = seen.get(s, 0)
            seen[s] = n + 1
            found.add(s if n == 0 else f"{s}-{n}")
        # Headings with inline code: read them from the raw text too.
        for m in re.finditer(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, flags=re.M):
            found.add(slug(m.group(1)))
        cache[path] = found
    return cache[path]


def check(root):
    broken = []
    files = markdown_files(root)
    for path in files:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for n, line in prose_lines(text):
            for m in LINK.finditer(line):
                target = m.group(1)
                if re.match(r"[a-z][a-z0-9+.-]*:", target):
                    continue
                file_part, _, anchor = target.partition("#")
                dest = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
                rel = os.path.relpath(path, root)
                if not os.path.exists(dest):
                    broken.append(f"{rel}:{n}: {target}: no file {os.path.relpath(dest, root)}")
                    continue
                if anchor and dest.endswith(".md") and anchor not in anchors(dest):
                    broken.append(f"{rel}:{n}: {target}: no heading #{anchor} in {os.path.relpath(dest, root)}")
    return files, broken


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    root = os.path.normpath(root)
    files, broken = check(root)
    for line in broken:
        print(line)
    print(f"{len(files)} Markdown files, {len(broken)} broken links")
    if not files:
        print("no Markdown file found: nothing was checked")
        sys.exit(1)
    sys.exit(1 if broken else 0)


if __name__ == "__main__":
    main()
