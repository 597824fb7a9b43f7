"""The package's version, the one place it is written (pyproject reads it through `pyfuse.__version__`); a module
of its own so that modules below the package's root can name it without importing the package."""

__version__ = "0.1.0"
