"""Serve ``lmcache.integration.sglang.*`` from ``lmc_transfer.integrations.sglang.lmcache_compat``.

SGLang 0.5.20's ``LMCRadixCache`` imports its connectors from LMCache's module
paths. ``install_lmcache_shim()`` puts a finder first on ``sys.meta_path`` that
answers those imports (and the parent packages ``lmcache``,
``lmcache.integration``, ``lmcache.integration.sglang``) with our classes; it
shadows a real LMCache for those names. This module imports nothing heavy, so a
``.pth`` line can install the finder in every Python process of an environment
(SGLang starts its scheduler in child processes)::

    python -m lmc_transfer.integrations.sglang.lmcache_shim install    # writes the .pth
    python -m lmc_transfer.integrations.sglang.lmcache_shim uninstall

The compat module itself (torch, the stores) is imported only when SGLang imports
one of the LMCache modules.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.abc
import importlib.machinery
import sys
import sysconfig
import types
from pathlib import Path

#: Module -> names it exposes from lmcache_compat; the other served names are bare packages.
_MODULES: dict[str, tuple[str, ...]] = {
    "lmcache.integration.sglang.multi_process_adapter": ("LMCacheMPConnector",),
    "lmcache.integration.sglang.sglang_adapter": ("LMCacheLayerwiseConnector", "LoadMetadata", "StoreMetadata"),
    "lmcache.integration.sglang.utils": ("lmcache_get_config",),
}
_PACKAGES = ("lmcache", "lmcache.integration", "lmcache.integration.sglang")
_COMPAT = "lmc_transfer.integrations.sglang.lmcache_compat"
PTH_NAME = "lmc_transfer_lmcache_shim.pth"
_PTH_LINE = "import lmc_transfer.integrations.sglang.lmcache_shim as _s; _s.install_lmcache_shim()\n"


class _LMCacheShimFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if fullname in _PACKAGES:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        if fullname in _MODULES:
            return importlib.machinery.ModuleSpec(fullname, self)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return None  # the default module object

    def exec_module(self, module: types.ModuleType) -> None:
        if module.__name__ in _PACKAGES:
            module.__path__ = []
            return
        compat = importlib.import_module(_COMPAT)
        for name in _MODULES[module.__name__]:
            setattr(module, name, getattr(compat, name))


def is_installed() -> bool:
    return any(isinstance(f, _LMCacheShimFinder) for f in sys.meta_path)


def install_lmcache_shim() -> None:
    """Make ``lmcache.integration.sglang.*`` resolve to lmc-transfer in this process; idempotent.

    Raises RuntimeError when a real ``lmcache`` was already imported here (its
    modules would keep being used)."""
    if is_installed():
        return
    loaded = sys.modules.get("lmcache")  # not ours: our finder is not installed yet
    if loaded is not None:
        raise RuntimeError(
            f"install_lmcache_shim: a real lmcache is already imported from {getattr(loaded, '__file__', '?')}; "
            "install the shim before anything imports lmcache"
        )
    sys.meta_path.insert(0, _LMCacheShimFinder())


def pth_path() -> Path:
    return Path(sysconfig.get_paths()["purelib"]) / PTH_NAME


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmc_transfer.integrations.sglang.lmcache_shim")
    parser.add_argument("action", choices=["install", "uninstall"], help="add or remove the .pth line in this environment")
    args = parser.parse_args(argv)
    path = pth_path()
    if args.action == "install":
        path.write_text(_PTH_LINE)
        print(f"wrote {path}")
    else:
        path.unlink(missing_ok=True)
        print(f"removed {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
