"""The ``hardneg`` command line, YAML config fragments, paper recipes, grids and reports."""
