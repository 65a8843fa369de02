#!/usr/bin/env python3
"""Guards the code's shape: no two files of src/ import each other (directly or around a loop),
and modules import only down the layers

    domain <- settings <- metrics <- paymennt <- ledger <- sources <- hooks <- verifier <- http
    <- daemon <- cli

(the sandbox and the command line stand apart). Test modules (`tests.rs` files and the
`#[cfg(test)] mod tests` blocks) are not counted. Prints what it finds; exits 1 if anything."""

import os
import re
import sys

LAYERS = ["domain", "settings", "metrics", "paymennt", "ledger", "sources", "hooks",
          "verifier", "http", "daemon", "cli"]

files = {}
for root, _, names in os.walk("src"):
    for name in names:
        if not name.endswith(".rs") or name == "tests.rs" or "/tests" in root:
            continue
        path = os.path.join(root, name)
        module = path[4:-3].replace("/mod", "").replace("/", "::")
        if module in ("lib", "main"):
            continue
        text = open(path, encoding="utf-8").read()
        files[module] = re.split(r"#\[cfg\(test\)\]\s*mod tests \{", text)[0]


def resolve(path):
    parts = path.split("::")
    for i in range(len(parts), 0, -1):
        candidate = "::".join(parts[:i])
        if candidate in files:
            return candidate
    return None


edges = {module: set() for module in files}
for module, text in files.items():
    parent = "::".join(module.split("::")[:-1])
    for line in text.split("\n"):
        line = re.sub(r"pub\(in [^)]*\)", "", line)
        if line.strip().startswith("//"):
            continue
        found = [resolve(x) for x in re.findall(r"crate::([a-z_]+(?:::[a-z_]+)*)", line)]
        found += [resolve((parent + "::" if parent else "") + x)
                  for x in re.findall(r"\bsuper::([a-z_]+(?:::[a-z_]+)*)", line)]
        child = re.match(r"\s*(?:pub(?:\([a-z]+\))? )?use ([a-z_]+)::", line)
        if child and child.group(1) not in ("crate", "super", "self", "std", "core"):
            found.append(resolve(module + "::" + child.group(1)))
        edges[module].update(f for f in found if f and f != module)

problems = []
# Loops between files (Tarjan's strongly connected components).
sys.setrecursionlimit(10000)
index, low, stack, on_stack, counter = {}, {}, [], set(), [0]


def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on_stack.add(v)
    for w in edges[v]:
        if w not in index:
            visit(w)
            low[v] = min(low[v], low[w])
        elif w in on_stack:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        component = []
        while True:
            w = stack.pop()
            on_stack.discard(w)
            component.append(w)
            if w == v:
                break
        if len(component) > 1:
            problems.append("files import each other: " + ", ".join(sorted(component)))


for v in edges:
    if v not in index:
        visit(v)

# Imports up the layers.
for module, targets in edges.items():
    top = module.split("::")[0]
    if top not in LAYERS:
        continue
    for target in targets:
        other = target.split("::")[0]
        if other in LAYERS and LAYERS.index(other) > LAYERS.index(top):
            problems.append(f"{module} imports {target}, a layer above it")

for problem in sorted(problems):
    print(f"check-imports: {problem}")
if problems:
    sys.exit(1)
print(f"check-imports: {len(files)} files, no loop, no import up the layers")
