#!/usr/bin/env python3
"""The import check of `make test`: no module imports a higher one, and no import circles.

Each crate declares its top-level modules from lowest to highest (LAYERS below). A module may
use the modules below it, never one above it, and siblings inside one module may not use each
other in a circle. References are read from `use` lines and from paths in code (`crate::x`,
`super::x`), with comments and strings left out. The layers' crate may not name the server
crate, pyo3 or anything Python.

    python3 scripts/check-imports.py        # exits 1 and says what is wrong
"""
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Lowest first. A module may use those before it in its list.
LAYERS = {
    "crates/pensieve-layers/src": ["wire", "config", "memory", "policy", "metrics", "layers", "stack", "guard"],
    # guard, layers, memory, policy, stack and wire here are the layers' crate, re-exported.
    "src": ["alloc", "wire", "memory", "policy", "layers", "stack", "guard", "config", "backend", "metrics", "api", "server", "cli"],
}
# (`self::pensieve::…` is the module wasmtime's bindgen makes of the WIT package `pensieve:policy`.)
FORBIDDEN = {"crates/pensieve-layers/src": [r"(?<!self::)\bpensieve::", r"\bpyo3\b", r"\bpensieve_bridge\b"]}
REEXPORTED = {"src": {"wire", "memory", "policy", "layers", "stack", "guard"}}

PATH = re.compile(r"\b(crate|super(?:::super)*)::((?:[a-z_][a-z0-9_]*::)*[a-zA-Z_][A-Za-z0-9_]*)")
GROUP = re.compile(r"\b(crate|super(?:::super)*)::\{([^}]*)\}")


def strip(text: str) -> str:
    """The code without comments and string literals (doc examples and messages are not imports)."""
    # Unit tests at the bottom of a file may use anything.
    text = re.split(r"#\[cfg\(test\)\]\s*mod tests\b", text)[0]
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r'r#*"(?:.|\n)*?"#*', '""', text)
    return re.sub(r'"(?:\\.|[^"\\])*"', '""', text)


def module_of(src: Path, file: Path) -> list[str]:
    parts = list(file.relative_to(src).with_suffix("").parts)
    if parts[-1] in ("mod", "lib", "main"):
        parts = parts[:-1]
    return parts


def resolve(module: list[str], head: str, rest: str) -> list[str]:
    if head == "crate":
        base = []
    else:
        base = module[: len(module) - head.count("super")]
    return base + rest.split("::")


def main() -> int:
    problems = []
    for rel, order in LAYERS.items():
        src = ROOT / rel
        rank = {m: i for i, m in enumerate(order)}
        siblings: dict[tuple, dict[str, set[str]]] = {}
        for file in sorted(src.rglob("*.rs")):
            raw = file.read_text()
            code = strip(raw)
            name = file.relative_to(ROOT)
            for pattern in FORBIDDEN.get(rel, []):
                if re.search(pattern, code):
                    problems.append(f"{name}: names `{pattern}`, which the layers' crate must not depend on")
            module = module_of(src, file)
            if not module or file.name in ("lib.rs", "main.rs"):
                continue
            in_test = "tests" in module or file.stem == "tests"
            targets = [resolve(module, h, r) for h, r in PATH.findall(code)]
            for head, group in GROUP.findall(code):
                for item in group.split(","):
                    item = item.strip().split(" as ")[0].strip()
                    if item and item != "self":
                        targets.append(resolve(module, head, item.split("::{")[0]))
            top = module[0]
            parent = tuple(module[:-1])
            for target in targets:
                if not target:
                    continue
                if target[0] in rank and target[0] != top:
                    if rank[target[0]] > rank[top] and not in_test:
                        problems.append(
                            f"{name}: `{top}` uses `{'::'.join(target)}`, a higher module ({' < '.join(order)})"
                        )
                    continue
                # A sibling module under the same parent (`super::b` from `a`, or `crate::x::b`).
                if in_test or len(target) <= len(parent) or tuple(target[: len(parent)]) != parent:
                    continue
                sib = target[len(parent)]
                if sib == module[-1]:
                    continue
                if (src / Path(*parent, sib + ".rs")).exists() or (src / Path(*parent, sib, "mod.rs")).exists():
                    siblings.setdefault(parent, {}).setdefault(module[-1], set()).add(sib)
        # Circles among siblings.
        for parent, graph in siblings.items():
            for a, uses in graph.items():
                for b in uses:
                    if a in graph.get(b, set()):
                        where = "::".join(parent) or "crate"
                        if a < b:
                            problems.append(f"{rel}: `{where}::{a}` and `{where}::{b}` use each other")
        # The server's re-exported modules are the layers' crate's: nothing of the server in them.
        for m in REEXPORTED.get(rel, set()):
            if (src / m).exists() or (src / f"{m}.rs").exists():
                problems.append(f"{rel}/{m}: the layers' crate's module `{m}` has a copy in the server")
    for p in problems:
        print(p)
    if problems:
        print(f"import check: {len(problems)} problem(s)")
        return 1
    print("import check: no upward import, no circle")
    return 0


if __name__ == "__main__":
    sys.exit(main())
