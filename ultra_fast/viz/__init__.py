"""Pictures of explanation maps: overlays and grids as PNG."""
from .grid import colorize, overlay, token_grid

__all__ = ["colorize", "overlay", "token_grid"]
