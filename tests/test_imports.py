"""The package's shape: no import circle anywhere (deferred imports included), and the tree is the import path."""

from __future__ import annotations

from pathlib import Path

import flagcx.adapters
import flagcx.topology

from .helpers.import_graph import LAYERS, ROOT, cycles, imports_of, layer_of, layer_violations, modules


def test_no_import_circles() -> None:
    assert cycles() == []


def test_imports_follow_the_layer_order() -> None:
    # frontends > core > hetero > adapters > topology > bootstrap > shared vocabulary, deferred imports included
    assert layer_violations() == []
    assert [name for name, _ in LAYERS][1:4] == ["frontends", "core", "hetero"]
    assert layer_of("flagcx.hetero.lanes") > layer_of("flagcx.core.selection")


def test_the_layer_check_sees_a_deferred_upward_import(tmp_path) -> None:
    planted = tmp_path / "lanes.py"
    planted.write_text("def f():\n    from ..core.selection import AdapterSet\n")
    known = set(modules())
    assert "flagcx.core.selection" in imports_of("flagcx.hetero.lanes", planted, known)


def test_every_layer_is_a_folder_of_the_package() -> None:
    names = set(modules())
    for layer in ("flagcx.frontends", "flagcx.core", "flagcx.hetero", "flagcx.adapters", "flagcx.topology"):
        assert layer in names, f"{layer} is not a package folder"
    assert "flagcx.frontends.process_group" in names and "flagcx.core.selection" in names


def test_adapters_and_topology_are_folders_of_the_package() -> None:
    # The real folders are flagcx/adapters and flagcx/topology (git, tracebacks, mypy and the wheel see one
    # path); the top-level adapters/ and topology/ are links into them, for readers of the requested layout.
    for name, module in (("adapters", flagcx.adapters), ("topology", flagcx.topology)):
        folder = ROOT / "flagcx" / name
        assert folder.is_dir() and not folder.is_symlink(), f"flagcx/{name} should be a real folder"
        link = ROOT / name
        assert link.is_symlink() and link.resolve() == folder, f"{name} should link to flagcx/{name}"
        assert Path(module.__file__).parent == folder
