"""The ``ultra-fast`` command."""
from .main import main

__all__ = ["main"]
