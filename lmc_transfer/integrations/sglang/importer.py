"""Import SGLang's radix-cache modules without importing the rest of SGLang.

``import sglang`` runs ``sglang/__init__.py``, which pulls in the language
frontend, FlashInfer and CUDA-only kernels; none of that is needed (and most of
it is not installable) to use ``sglang.srt.mem_cache``. ``load_sglang`` registers
a bare ``sglang`` package module that only carries the installed package's
path, so submodules import normally while ``sglang/__init__.py`` never runs.
Inside a running SGLang server ``sglang`` is already imported and is left as it is.

Two packages that some mem_cache import chains touch only for type hints or
notebook helpers (``torchvision``, ``IPython``) are replaced by empty modules,
and only when they are not installed.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Collection

#: Packages stubbed with an empty module when missing (imported, never used, by mem_cache chains).
_STUBBABLE = ("torchvision", "IPython")


class SGLangUnavailable(ImportError):
    """SGLang is not installed, or the installed release is not one this integration supports."""


@dataclass(frozen=True)
class SGLangInstall:
    version: str
    package_dir: Path


def installed_sglang() -> SGLangInstall:
    """Version and location of the ``sglang`` distribution that ``import sglang`` would load."""
    try:
        dist = importlib.metadata.distribution("sglang")
    except importlib.metadata.PackageNotFoundError:
        raise SGLangUnavailable("SGLang is not installed (no 'sglang' distribution found)") from None
    spec = importlib.util.find_spec("sglang") if "sglang" not in sys.modules else sys.modules["sglang"].__spec__
    if spec is None or not spec.submodule_search_locations:
        raise SGLangUnavailable(f"SGLang {dist.version} is installed but 'sglang' is not an importable package")
    package_dir = Path(next(iter(spec.submodule_search_locations))).resolve()
    dist_dir = Path(str(dist.locate_file("sglang"))).resolve()
    if package_dir != dist_dir:
        # Two installs on sys.path (e.g. a --target overlay): the metadata and the code disagree.
        raise SGLangUnavailable(
            f"the 'sglang' package imported from {package_dir} does not belong to the SGLang {dist.version} "
            f"distribution found at {dist_dir}; put one SGLang install first on sys.path"
        )
    return SGLangInstall(version=dist.version, package_dir=package_dir)


class _Unavailable:
    """Stands in for any attribute of a stubbed package; using it fails loudly."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> "_Unavailable":
        return _Unavailable(f"{self._name}.{attr}")

    def __call__(self, *args: object, **kwargs: object) -> None:
        raise ImportError(f"{self._name} is not installed (stubbed by lmc_transfer for importing SGLang's mem_cache)")


class _StubModule(types.ModuleType):
    def __getattr__(self, attr: str) -> _Unavailable:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Unavailable(f"{self.__name__}.{attr}")


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves empty modules for the stubbed packages and every submodule under them; it sits
    last on sys.meta_path, so a package installed later still wins."""

    def __init__(self, roots: Collection[str]) -> None:
        self.roots = tuple(roots)

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if fullname.split(".")[0] not in self.roots:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _StubModule(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        module.__path__ = []


def _stub_missing_packages() -> None:
    missing = [name for name in _STUBBABLE if importlib.util.find_spec(name) is None]
    if not missing:
        return
    if "torchvision" in missing and importlib.util.find_spec("transformers") is not None:
        # transformers caches whether torchvision exists the first time it asks; ask now,
        # while the answer is still "no", or it would import torchvision.transforms for real.
        from transformers.utils import import_utils

        probe = getattr(import_utils, "is_torchvision_available", None)
        if probe is not None:
            probe()
    sys.meta_path.append(_StubFinder(missing))


def load_sglang(supported: Collection[str], feature: str) -> SGLangInstall:
    """Make ``sglang.srt.mem_cache.*`` importable and check the release.

    ``supported``: the SGLang versions ``feature`` (named in the error) was verified
    against. Raises ``SGLangUnavailable`` naming the installed version otherwise.
    """
    install = installed_sglang()
    if install.version not in supported:
        raise SGLangUnavailable(
            f"{feature} supports SGLang {', '.join(sorted(supported))}; the installed SGLang is "
            f"{install.version} (at {install.package_dir})"
        )
    if "sglang" in sys.modules:
        return install  # a running SGLang (or an earlier call) already set everything up
    _stub_missing_packages()
    bare = types.ModuleType("sglang")
    bare.__path__ = [str(install.package_dir)]
    bare.__file__ = str(install.package_dir / "__init__.py")
    bare.__version__ = install.version
    bare.__spec__ = importlib.util.spec_from_file_location(
        "sglang", bare.__file__, submodule_search_locations=bare.__path__
    )
    sys.modules["sglang"] = bare
    return install


def import_mem_cache(module: str, supported: Collection[str], feature: str) -> types.ModuleType:
    """``sglang.srt.mem_cache.<module>``, imported through ``load_sglang``."""
    install = load_sglang(supported, feature)
    try:
        return importlib.import_module(f"sglang.srt.mem_cache.{module}")
    except ImportError as exc:
        raise SGLangUnavailable(
            f"{feature}: importing sglang.srt.mem_cache.{module} from SGLang {install.version} failed: {exc}"
        ) from exc
