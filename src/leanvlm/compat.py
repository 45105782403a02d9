"""What the runtime relies on from transformers, found by type and public contract, never by keyword name.

transformers renames keyword arguments between releases (5.24 passes the KV cache as `cache=`, earlier
5.x as `past_key_values=`), so nothing here looks a cache up by name: a forward's cache is the one
argument that is a `transformers.Cache`. `tests/test_contract.py` checks each assumption listed in this
module against the installed transformers, one named test per assumption. The supported range is
pyproject's `transformers` pin: its lower bound and the newest minor CI has proven.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import re
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from packaging.specifiers import SpecifierSet
from packaging.version import Version

if TYPE_CHECKING:
    from transformers import Cache


def find_cache(args: tuple, kwargs: dict[str, Any]) -> Cache | None:
    """The KV cache a forward received (positional or keyword, whatever its name), or None."""
    from transformers import Cache  # here, not at import: `import leanvlm` stays free of transformers

    for value in (*args, *kwargs.values()):
        if isinstance(value, Cache):
            return value
    return None


def cache_of(output: Any) -> Cache:
    """The Cache instance a model forward returned (`output.cache` in 5.24, `.past_key_values` before)."""
    from transformers import Cache

    caches = [value for value in output.values() if isinstance(value, Cache)]
    if len(caches) != 1:
        raise ValueError(f"expected one transformers.Cache in the model output, found {len(caches)}")
    return caches[0]


def cache_keyword(function: Callable[..., Any]) -> str:
    """The name under which `function` (e.g. a model's forward) takes the KV cache: its parameter
    annotated as a Cache (5.24: `cache`, earlier: `past_key_values`)."""
    for name, parameter in inspect.signature(function).parameters.items():
        if "Cache" in str(parameter.annotation):
            return name
    raise ValueError(f"{getattr(function, '__qualname__', function)} has no parameter annotated as a Cache")


def cache_length(cache: Cache | None) -> int:
    """Tokens already in the cache's first layer (0 for no cache): the model's own notion of the past."""
    return 0 if cache is None else int(cache.get_seq_length())


def sliding_window_of(cache: Cache | None, layer: int) -> int | None:
    """The window W of a cache layer that keeps only its last W - 1 tokens (a sliding-window attention
    layer of a dynamic cache), or None for a layer that keeps every token."""
    layers = getattr(cache, "layers", None)
    if layers is None or layer >= len(layers) or not getattr(layers[layer], "is_sliding", False):
        return None
    return int(layers[layer].sliding_window)


def without_cache_arguments(function: Callable[..., Any], values: dict[str, Any]) -> dict[str, Any]:
    """The entries of `values` that `function` accepts as parameters, minus any that hold a Cache.

    For calling a model helper (e.g. Qwen2-VL's `compute_3d_position_ids`) on the whole prompt: its cache
    parameter, whatever the installed version names it, stays at its default (None = no past).
    """
    from transformers import Cache

    names = inspect.signature(function).parameters
    return {name: value for name, value in values.items() if name in names and not isinstance(value, Cache)}


def requirement(package: str) -> str | None:
    """leanvlm's own version specifier for `package` from its installed metadata (pyproject's pin), or None."""
    try:
        requires = importlib.metadata.requires("leanvlm") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for line in requires:
        if ";" in line:  # an extra's requirement
            continue
        name = re.split(r"[<>=!~ \[]", line, maxsplit=1)[0]
        if name.lower() == package.lower():
            return line[len(name):].strip()
    return None


def version_check(package: str) -> dict[str, Any]:
    """{name, installed, tested, ok}: whether the installed `package` is inside the range leanvlm tests."""
    try:
        installed = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return {"name": package, "installed": None, "tested": requirement(package), "ok": False}
    spec = requirement(package)
    ok = True if not spec else Version(Version(installed).public) in SpecifierSet(spec)  # 2.13.0+cpu -> 2.13.0
    return {"name": package, "installed": installed, "tested": spec, "ok": ok}


_warned = False


def warn_if_untested() -> None:
    """Warn once per process when the installed transformers is outside the tested range (not an error)."""
    global _warned
    if _warned:
        return
    _warned = True
    check = version_check("transformers")
    if check["installed"] and not check["ok"]:
        warnings.warn(
            f"transformers {check['installed']} is outside the range leanvlm is tested with ({check['tested']}); "
            "it may work, and if it does not, please report it with the output of `leanvlm doctor` "
            "(README: 'Supported transformers versions')", RuntimeWarning, stacklevel=2)
