"""Every module of the platform imports: the cheapest check that the dependency floors in pyproject.toml
are true (bin/lowest runs it against the lowest versions they allow)."""

import importlib
import pkgutil

import pytest

import hrserve
import llmchat


def modules() -> list[str]:
    names = []
    for package in (hrserve, llmchat):
        names += [info.name for info in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
    return names


@pytest.mark.parametrize("name", modules())
def test_module_imports(name):
    importlib.import_module(name)
