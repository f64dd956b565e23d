"""Heat-map overlays of explanation maps on the image, laid out as a grid with the token marked;
segmentation pictures (palette label PNG, colour overlay); the interactive explorer page of every token's map.

``ultra_fast.viz.explorer`` is the function (the module of the same name: ``ultra_fast.viz.explorer`` in
``from ... import`` statements, e.g. ``from ultra_fast.viz.explorer import render_explorer``).
"""
from .explorer import ExplorerData, explorer, explorer_data, explorer_from_maps, render_explorer, save_explorer
from .grid import colorize, overlay, token_grid
from .labels import label_image, label_overlay, palette, read_labels

__all__ = ["colorize", "overlay", "token_grid", "label_image", "label_overlay", "palette", "read_labels",
           "ExplorerData", "explorer", "explorer_data", "explorer_from_maps", "render_explorer", "save_explorer"]
