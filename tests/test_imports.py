"""The package's shape: no import circle anywhere (deferred imports included), and the tree is the import path."""

from __future__ import annotations

from pathlib import Path

import flagcx.adapters
import flagcx.topology

from .helpers.import_graph import ROOT, cycles, modules


def test_no_import_circles() -> None:
    assert cycles() == []


def test_every_layer_is_a_folder_of_the_package() -> None:
    names = set(modules())
    for layer in ("flagcx.frontends", "flagcx.core", "flagcx.hetero", "flagcx.adapters", "flagcx.topology"):
        assert layer in names, f"{layer} is not a package folder"
    assert "flagcx.frontends.process_group" in names and "flagcx.core.selection" in names


def test_adapters_and_topology_resolve_from_the_checkout() -> None:
    # flagcx/adapters and flagcx/topology are links to the top-level folders: a plain checkout resolves them
    for name, module in (("adapters", flagcx.adapters), ("topology", flagcx.topology)):
        link = ROOT / "flagcx" / name
        assert link.is_symlink() and link.resolve() == ROOT / name, f"flagcx/{name} should link to ../{name}"
        assert Path(module.__file__).resolve().parent == ROOT / name
