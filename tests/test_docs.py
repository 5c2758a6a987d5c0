"""docs/ARCHITECTURE.md names only things that exist: files and folders, modules and their names, config keys.

What the document names, and how it is read here: backticked paths (a ``/`` in them) and the paths of its tree
block, relative to the checkout; backticked dotted names starting ``noisebench.`` and every ``from noisebench...
import a, b`` line, imported; every ``cfg.<key>``, looked up in the composed config.
"""
from __future__ import annotations

import importlib
import re

import pytest
from omegaconf import OmegaConf

from conftest import REPO, compose

DOC = (REPO / "docs" / "ARCHITECTURE.md").read_text()
TICKED = re.findall(r"`([^`\n]+)`", DOC)
CODE = "\n".join(re.findall(r"```(?:python)?\n(.*?)```", DOC, flags=re.S))


def _tree_paths() -> list[str]:
    """The paths of the tree block: top-level entries, and entries indented under the folder above them."""
    tree = next(b for b in re.findall(r"```\n(.*?)```", DOC, flags=re.S) if b.startswith("conf/"))
    stack: list[tuple[int, str]] = []
    out = []
    for line in tree.splitlines():
        depth = (len(line) - len(line.lstrip())) // 2
        name = line.split()[0]
        stack = [s for s in stack if s[0] < depth]
        path = "".join(s[1] for s in stack) + name
        out.append(path)
        if name.endswith("/"):
            stack.append((depth, name))
    return out


PATHS = sorted({t.split()[0].rstrip("/") for t in TICKED
                if "/" in t and not re.search(r"[<>*{}()=]", t)}
               | {p.rstrip("/") for p in _tree_paths()})
MODULE_NAMES = sorted({t for t in TICKED if re.fullmatch(r"noisebench(\.\w+)+", t)})
IMPORTS = sorted({(m, n.strip()) for m, names in re.findall(r"from (noisebench[\w.]*) import ([\w, ]+)", CODE)
                  for n in names.split(",")})
CONFIG_KEYS = sorted(set(re.findall(r"\bcfg\.([\w.]+\w)", DOC)))


def test_the_document_names_things_to_check():
    assert len(PATHS) > 20 and len(MODULE_NAMES) >= 3 and len(IMPORTS) >= 10 and len(CONFIG_KEYS) >= 2


@pytest.mark.parametrize("path", PATHS)
def test_named_path_exists(path):
    assert (REPO / path).exists(), f"docs/ARCHITECTURE.md names {path}, which is not in the checkout"


def _resolve(dotted: str):
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


@pytest.mark.parametrize("name", MODULE_NAMES)
def test_named_module_or_attribute_exists(name):
    _resolve(name)


@pytest.mark.parametrize("module,name", IMPORTS)
def test_imported_name_exists(module, name):
    assert hasattr(importlib.import_module(module), name), f"{module} has no {name}"


@pytest.mark.parametrize("key", CONFIG_KEYS)
def test_named_config_key_exists(key):
    cfg = compose()
    assert OmegaConf.select(cfg, key, default="<missing>") != "<missing>", f"cfg.{key} is not a config key"
