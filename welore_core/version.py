"""The version of welore (a module of its own, so that modules importing it do not import the package's
__init__, which lazily imports the Python API)."""

__version__ = "0.1.0"
