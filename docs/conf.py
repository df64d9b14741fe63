"""Sphinx configuration for the openfl_api documentation.

Build with ``python -m sphinx -W --keep-going -b html docs docs/_build/html`` from the
repository root. The package is imported from the checkout, not from an installation.
"""

import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

import openfl_api  # noqa: E402  (needs the path above)

project = "openfl_api"
author = "openfl_api developers"
copyright = "openfl_api developers"
release = openfl_api.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]

exclude_patterns = ["_build"]
root_doc = "index"

# Google-style docstrings only: the launcher's manual uses reST section titles such as
# "Examples" underlined with dashes, which the NumPy parser would rewrite.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
# Show defaults as written in the source: ``environ=os.environ`` rather than the whole
# environment of the machine that builds the docs.
autodoc_preserve_defaults = True
autoclass_content = "both"

html_theme = "alabaster"
html_theme_options = {
    "description": "Federated learning for PyTorch, one training loop on every rank.",
    "fixed_sidebar": True,
}
html_static_path = []
