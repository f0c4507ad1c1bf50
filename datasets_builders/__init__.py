"""Dataset builders (instruction data, image folders, VTAB/FGVC); see the README of each issue."""
