#!/usr/bin/env python3
"""Checks that the code's imports follow the written architecture.

Usage: scripts/import-cycles.py [--rules ARCHITECTURE.md] SRC [SRC ...]
       scripts/import-cycles.py --self-test

For each crate source folder (relay/src, agent/src, runtime/src, proto/src) it builds two graphs
from the non-test code:

- files: an edge A -> B for each path in A that names an item of module file B: `crate::x::y`,
  `super::y`, `self::y`, a child module's name (`child::y`), and every path of a `use` tree
  (`use crate::{a::b, c}`). A path resolves to the deepest module it names.
- modules: the same edges between top-level modules (a file or folder directly under src/;
  lib.rs and main.rs are `lib`).

It fails, printing one line per breach with the file, the line and the rule, when
- two or more files import each other in a circle (inside a folder or across folders);
- top-level modules import each other in a cycle;
- a module imports lib.rs (the crate's map: nothing imports it back);
- library code (not main.rs, not tests) spawns a task with a bare `tokio::spawn`: every task has
  an owner, a `TaskTracker` that a stop or a drain closes and waits for;
- with --rules, an import between top-level modules is not in the "may use" table that
  ARCHITECTURE.md gives for that crate (the table under the heading that names the crate), or a
  top-level module is missing from that table.
"""
import os
import re
import sys
import tempfile

USE_RE = re.compile(r"\b(?:pub(?:\([^)]*\))?\s+)?use\s+([^;]+);")
PREFIX_RE = re.compile(r"(?<![\w:$])(crate|super|self)((?:::super)*)::")


def strip(text):
    """Drops test modules and comments, keeping line numbers."""
    m = re.search(r"#\[cfg\((?:test|all\(test[^\]]*)\)\]\s*mod\s+\w+", text)
    if m:
        text = text[: m.start()]
    text = re.sub(r"/\*.*?\*/", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    # String literals may hold `crate::`-like text (log messages); blank them out.
    return re.sub(r'"(?:[^"\\\n]|\\.)*"', '""', text)


def expand(tree):
    """The full paths of a `use` tree: `a::{b, c::{d, e}}` -> [a::b, a::c::d, a::c::e]."""
    tree = re.sub(r"\s+as\s+\w+", "", tree)
    tree = re.sub(r"\s+", "", tree)
    out = []

    def walk(prefix, t):
        i, depth, parts, item = 0, 0, [], ""
        # Split a top-level comma list.
        for ch in t:
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            if ch == "," and depth == 0:
                parts.append(item)
                item = ""
            else:
                item += ch
        parts.append(item)
        for part in parts:
            if not part:
                continue
            b = part.find("{")
            if b >= 0 and part.endswith("}"):
                head = part[:b].rstrip(":")
                walk(prefix + ([s for s in head.split("::") if s] if head else []), part[b + 1 : -1])
            else:
                segs = [s for s in part.split("::") if s]
                if segs and segs[-1] == "self":
                    segs = segs[:-1]
                out.append(prefix + segs)

    walk([], tree)
    return out


class Crate:
    def __init__(self, src):
        self.src = src
        self.files = {}  # module path tuple -> file path
        for root, _, names in os.walk(src):
            for name in names:
                if not name.endswith(".rs"):
                    continue
                path = os.path.join(root, name)
                rel = os.path.relpath(path, src)[:-3].split(os.sep)
                if rel[-1] == "mod":
                    rel = rel[:-1]
                if rel in (["lib"], ["main"]):
                    rel = []
                mod = tuple(rel)
                # A binary crate's main.rs and a library's lib.rs are both the root; prefer lib.rs.
                if mod in self.files and name == "main.rs":
                    continue
                self.files[mod] = path
        self.modules = set(self.files)

    def children(self, mod):
        return {m[-1] for m in self.modules if len(m) == len(mod) + 1 and m[: len(mod)] == mod}

    def resolve(self, base, segs):
        """The deepest module that `base` + `segs` names."""
        mod = tuple(base)
        for s in segs:
            if mod + (s,) in self.modules:
                mod = mod + (s,)
            else:
                break
        return mod

    def refs(self, mod, text):
        """(line, target module, path text) for each path in `text` (file of module `mod`)."""
        out = []
        children = self.children(mod)
        parent = mod[:-1] if mod else mod
        line_of = lambda pos: text.count("\n", 0, pos) + 1

        def root_of(first, rest):
            if first == "crate":
                return (), rest
            if first == "super":
                base = parent
                while rest and rest[0] == "super":
                    base, rest = base[:-1], rest[1:]
                return base, rest
            if first == "self":
                return mod, rest
            if first in children:
                return mod, [first] + rest
            return None, None

        spans = []
        for m in USE_RE.finditer(text):
            spans.append((m.start(), m.end()))
            for path in expand(m.group(1)):
                if not path:
                    continue
                base, rest = root_of(path[0], path[1:])
                if base is not None:
                    out.append((line_of(m.start()), self.resolve(base, rest), "::".join(path)))
        in_use = lambda pos: any(a <= pos < b for a, b in spans)
        for m in PREFIX_RE.finditer(text):
            if in_use(m.start()):
                continue
            tail = re.match(r"[\w:]*", text[m.end() :]).group(0)
            segs = [s for s in tail.split("::") if s]
            first = m.group(1)
            supers = [s for s in m.group(2).split("::") if s]
            base, rest = root_of(first, supers + segs)
            out.append((line_of(m.start()), self.resolve(base, rest), m.group(0) + tail))
        if children:
            for m in re.finditer(r"(?<![\w:{,])\b(" + "|".join(sorted(children)) + r")::(\w+)", text):
                if in_use(m.start()):
                    continue
                out.append((line_of(m.start()), self.resolve(mod, [m.group(1), m.group(2)]), m.group(0)))
        return out


def sccs(nodes, edges):
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
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
                comps.append(sorted(comp))

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return comps


def read_rules(path):
    """{crate name: {module: set of modules it may use}} from the "may use" tables of ARCHITECTURE.md."""
    rules, crate, table, seen = {}, None, None, []
    with open(path, encoding="utf-8") as f:
        for line in f:
            heading = re.match(r"#{2,3}\s+(.*)", line)
            if heading:
                words = heading.group(1).lower()
                crate = next((c for c in ("relay", "agent", "runtime", "proto") if re.search(r"\b" + c + r"\b", words)), None)
                table = None
                continue
            if re.match(r"\|\s*module\s*\|\s*may use\s*\|", line):
                if crate is None:
                    raise SystemExit(f"{path}: a 'may use' table under no crate's heading")
                table, seen = rules.setdefault(crate, {}), []
                continue
            if table is None:
                continue
            if not line.startswith("|"):
                table = None
                continue
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) < 2 or set(cells[0]) <= set("-: "):
                continue
            names = re.findall(r"`([\w/]+)`", cells[0])
            if not names:
                continue
            allowed = set(re.findall(r"`(\w+)`", re.sub(r"\([^)]*\)", "", cells[1])))
            if "all of the above" in cells[1]:
                allowed |= set(seen)
            for name in names:
                table[name] = allowed
                seen.append(name)
    return rules


def crate_name(src):
    parts = os.path.normpath(os.path.abspath(src)).split(os.sep)
    return parts[-2] if parts[-1] == "src" else parts[-1]


def check(src, rules=None, out=print):
    """Prints the crate's edges and breaches; returns the number of breaches."""
    crate = Crate(src)
    name = crate_name(src)
    file_edges, mod_edges, where, spawns = {}, {}, {}, []
    for mod, path in sorted(crate.files.items()):
        with open(path, encoding="utf-8") as f:
            text = strip(f.read())
        top = mod[0] if mod else "lib"
        if os.path.basename(path) != "main.rs":
            for m in re.finditer(r"\btokio::spawn\(", text):
                line = text.count("\n", 0, m.start()) + 1
                spawns.append(f"{path}:{line}: a bare tokio::spawn: spawn into the TaskTracker that owns the task")
        for line, target, shown in crate.refs(mod, text):
            # lib.rs only declares and re-exports: its edges are the map, not imports.
            if target == mod or not mod:
                continue
            # A module may always reach into its own descendants' items through its children; a
            # file naming its ancestor's item is an import of that ancestor.
            file_edges.setdefault(mod, set()).add(target)
            where.setdefault((mod, target), (path, line, shown))
            ttop = target[0] if target else "lib"
            if ttop != top:
                mod_edges.setdefault(top, set()).add(ttop)
                where.setdefault((top, ttop), (path, line, shown))
    breaches = list(spawns)
    tops = {m[0] if m else "lib" for m in crate.modules}
    for comp in sccs(crate.modules, file_edges):
        names = [crate.files[m] for m in comp]
        links = []
        for a in comp:
            for b in comp:
                if b in file_edges.get(a, ()):
                    p, l, shown = where[(a, b)]
                    links.append(f"{p}:{l} ({shown})")
        breaches.append(f"FILE CIRCLE: {' <-> '.join(names)}: " + "; ".join(links))
    for comp in sccs(tops, mod_edges):
        breaches.append(f"CYCLE: {' <-> '.join(comp)}")
    for top in sorted(tops - {"lib"}):
        if "lib" in mod_edges.get(top, ()):
            p, l, shown = where[(top, "lib")]
            breaches.append(f"{p}:{l}: {top} imports lib.rs ({shown}): nothing imports the crate's map back")
    if rules is not None:
        table = rules.get(name)
        if table is None:
            breaches.append(f"ARCHITECTURE.md has no 'may use' table for {name}")
        else:
            for top in sorted(tops - {"lib"}):
                if top not in table:
                    breaches.append(f"{name}: module {top} is not in ARCHITECTURE.md's 'may use' table")
                    continue
                for used in sorted(mod_edges.get(top, set()) - {"lib"}):
                    if used not in table[top]:
                        p, l, shown = where[(top, used)]
                        allowed = ", ".join(sorted(table[top])) or "nothing of the crate"
                        breaches.append(
                            f"{p}:{l}: {top} uses {used} ({shown}), but ARCHITECTURE.md says {top} may use: {allowed}"
                        )
    out(f"{src}:")
    for top in sorted(mod_edges):
        if top != "lib":
            out(f"  {top} -> {', '.join(sorted(mod_edges[top]))}")
    for b in breaches:
        out(f"  {b}")
    if not breaches:
        out(f"  {len(crate.files)} files: no circle, no cycle" + (", every import as written" if rules else ""))
    return len(breaches)


def self_test():
    """The checker catches what it says it catches."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "relay", "src")
        os.makedirs(os.path.join(src, "tunnel"))
        files = {
            "lib.rs": "mod config;\nmod tunnel;\n",
            "config.rs": "pub struct Config;\nfn f() { tokio::spawn(async {}); }\n",
            "tunnel/mod.rs": "mod a;\nmod b;\npub use a::A;\n",
            "tunnel/a.rs": "use super::b::B;\npub struct A;\n",
            "tunnel/b.rs": "use crate::{config::Config, tunnel::{a::A}};\npub struct B;\n"
            "#[cfg(test)]\nmod tests { use crate::lib_only; }\n",
        }
        for rel, text in files.items():
            with open(os.path.join(src, rel), "w") as f:
                f.write(text)
        rules_path = os.path.join(tmp, "ARCHITECTURE.md")
        with open(rules_path, "w") as f:
            f.write("## The relay\n\n| module | may use |\n|---|---|\n| `config` | nothing |\n| `tunnel` | nothing of the crate |\n")
        lines = []
        failures = check(src, read_rules(rules_path), out=lines.append)
        text = "\n".join(lines)
        assert "FILE CIRCLE" in text and "tunnel/a.rs" in text and "tunnel/b.rs" in text, text
        assert "tunnel uses config (crate::config::Config)" in text, text
        assert "imports lib.rs" not in text, text
        assert "config.rs:2: a bare tokio::spawn" in text, text
        assert failures == 3, text
        # Fixed: the circle opened and the rule written, nothing is left.
        with open(os.path.join(src, "tunnel/b.rs"), "w") as f:
            f.write("use crate::config::Config;\npub struct B;\n")
        with open(os.path.join(src, "config.rs"), "w") as f:
            f.write("pub struct Config;\n")
        with open(rules_path, "w") as f:
            f.write("## The relay\n\n| module | may use |\n|---|---|\n| `config` | nothing |\n| `tunnel` | `config` |\n")
        lines = []
        assert check(src, read_rules(rules_path), out=lines.append) == 0, "\n".join(lines)
    print("self-test passed: a file circle, a module outside its rule, a bare spawn and a clean tree are told apart")


def main():
    args = sys.argv[1:]
    if args == ["--self-test"]:
        self_test()
        return
    rules = None
    if args[:1] == ["--rules"]:
        rules = read_rules(args[1])
        args = args[2:]
    if not args:
        raise SystemExit(__doc__)
    failed = sum(check(src, rules) for src in args)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
