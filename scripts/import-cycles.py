#!/usr/bin/env python3
"""Fails when top-level modules of a crate import each other in a cycle.

Usage: scripts/import-cycles.py relay/src agent/src

A module is a file or folder directly under src/ (lib.rs and main.rs count as `lib`). An edge
A -> B is any `crate::B` path in A's non-test code, including paths inside nested `use crate::{..}`
groups. Prints each crate's edges and cycles; exits 1 if any crate has a cycle or if a module
imports `lib`.
"""
import os
import re
import sys


def strip_tests_and_comments(text):
    text = re.split(r"#\[cfg\(test\)\]\s*mod\s+\w+", text)[0]
    return re.sub(r"//[^\n]*", "", text)


def group_heads(body):
    """The first path segment of each item of a `{...}` use group, recursing into nested groups."""
    heads, depth, item = [], 0, ""
    for ch in body + ",":
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if ch == "," and depth == 0:
            m = re.match(r"\s*(\w+)", item)
            if m:
                heads.append(m.group(1))
            item = ""
        else:
            item += ch
    return heads


def crate_refs(text):
    refs = set(re.findall(r"\bcrate::(\w+)", text))
    for m in re.finditer(r"\bcrate::\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        refs.update(group_heads(text[m.end() : i - 1]))
    return refs


def module_of(src, path):
    first = os.path.relpath(path, src).split(os.sep)[0]
    if first in ("lib.rs", "main.rs"):
        return "lib"
    return first[:-3] if first.endswith(".rs") else first


def check(src):
    mods = {"lib"}
    for entry in os.listdir(src):
        if entry.endswith(".rs") and entry not in ("lib.rs", "main.rs"):
            mods.add(entry[:-3])
        elif os.path.isdir(os.path.join(src, entry)):
            mods.add(entry)
    edges = {m: set() for m in mods}
    for root, _, files in os.walk(src):
        for name in files:
            if not name.endswith(".rs"):
                continue
            path = os.path.join(root, name)
            here = module_of(src, path)
            with open(path, encoding="utf-8") as f:
                text = strip_tests_and_comments(f.read())
            # A path to something that is not a module names an item of lib.rs.
            refs = {r if r in mods else "lib" for r in crate_refs(text)}
            edges[here] |= {r for r in refs if r != here}
    # lib.rs declares and re-exports modules: it is the root, and nothing may import it back.
    importers_of_lib = sorted(m for m in mods if m != "lib" and "lib" in edges[m])
    edges["lib"] = set()
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for m in sorted(mods):
        if m not in index:
            visit(m)
    return edges, cycles, importers_of_lib


def main():
    failed = False
    for src in sys.argv[1:]:
        edges, cycles, lib_importers = check(src)
        print(f"{src}:")
        for m in sorted(edges):
            if edges[m]:
                print(f"  {m} -> {', '.join(sorted(edges[m]))}")
        for c in cycles:
            print(f"  CYCLE: {' <-> '.join(c)}")
        if lib_importers:
            print(f"  imports lib.rs: {', '.join(lib_importers)}")
        failed |= bool(cycles or lib_importers)
        if not cycles and not lib_importers:
            print("  no import cycle")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
