"""The package version: the one source (pyproject.toml reads it, ``relucap --version`` prints it)."""

__version__ = "0.1.0.dev0"
