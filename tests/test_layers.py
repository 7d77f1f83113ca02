"""The dependency rule of the layout: every import points down the layers (lore_pl/__init__.py)."""

import ast
from pathlib import Path

from helpers import ROOT

#: layer of each part; a module may import its own layer and the ones below
LAYERS = {
    "lore_pl.errors": 0,
    "lore_pl.core": 1,
    "lore_pl.data": 2,
    "lore_pl.modules": 3,
    "lore_pl.inference": 3,
    "lore_pl.rlhf": 3,
    "datamodules": 4,
    "callbacks": 4,
    "lore_pl.experiments": 5,
    "lore_pl.cli": 5,
    "lore_pl.serving": 5,
    "lore_pl.__main__": 5,
}
#: the parts that must run without Lightning (pure math, containers and files, the inference API)
WITHOUT_LIGHTNING = ("lore_pl.core", "lore_pl.data", "lore_pl.inference", "lore_pl.rlhf", "lore_pl.errors")
PACKAGES = ("lore_pl", "datamodules", "callbacks")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int | None:
    for prefix, layer in sorted(LAYERS.items(), key=lambda item: -len(item[0])):
        if module == prefix or module.startswith(prefix + "."):
            return layer
    return None


def lazy_target(name: str) -> str:
    """``from lore_pl import X`` goes through the lazy table of lore_pl/__init__.py."""
    tree = ast.parse((ROOT / "lore_pl" / "__init__.py").read_text())
    table = next(node.value for node in ast.walk(tree) if isinstance(node, ast.Assign)
                 and getattr(node.targets[0], "id", "") == "_EXPORTS")
    return ast.literal_eval(table)[name]


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) of every import in the file, in functions too."""
    found = []
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            if base == "lore_pl":
                found += [(node.lineno, lazy_target(alias.name)) for alias in node.names]
            else:
                found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def sources():
    for package in PACKAGES:
        yield from sorted((ROOT / package).rglob("*.py"))


def test_every_import_points_down_the_layers():
    wrong = []
    for path in sources():
        here = module_name(path)
        mine = layer_of(here)
        if here == "lore_pl":
            continue  # the lazy table names every layer by design; it imports none of them
        assert mine is not None, f"{here} has no layer in LAYERS"
        for line, target in imports(path):
            theirs = layer_of(target)
            if theirs is not None and theirs > mine:
                wrong.append(f"{path.relative_to(ROOT)}:{line} (layer {mine}) imports {target} (layer {theirs})")
            if here.startswith(WITHOUT_LIGHTNING) and target.split(".")[0] in ("lightning", "pytorch_lightning"):
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target}, but this layer runs without Lightning")
    assert not wrong, "\n".join(wrong)


def test_the_rule_sees_a_wrong_way_import(tmp_path):
    # the check itself: a core module importing a LightningModule is caught
    bad = ROOT / "lore_pl" / "core" / "_wrong_way_probe.py"
    bad.write_text("from lore_pl.modules.basis import BasisModule\nfrom lore_pl import ScoringModule\n")
    try:
        targets = [layer_of(target) for _, target in imports(bad)]
        assert targets == [3, 3] and layer_of(module_name(bad)) == 1
    finally:
        bad.unlink()


def test_nobody_imports_pytorch_lightning_and_lore_pl_stays_small():
    for path in sources():
        assert not any(target.split(".")[0] == "pytorch_lightning" for _, target in imports(path)), path
    top_level = [p for p in (ROOT / "lore_pl").glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert len(top_level) <= 8, sorted(p.name for p in top_level)


def test_ruff_is_clean():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(ROOT)], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-1000:]
