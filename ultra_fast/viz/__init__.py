"""Heat-map overlays of explanation maps on the image, laid out as a grid with the token marked;
segmentation pictures (palette label PNG, colour overlay)."""
from .grid import colorize, overlay, token_grid
from .labels import label_image, label_overlay, palette, read_labels

__all__ = ["colorize", "overlay", "token_grid", "label_image", "label_overlay", "palette", "read_labels"]
