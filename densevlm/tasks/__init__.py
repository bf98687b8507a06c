"""Drivers of whole jobs, above every library package (see docs/ARCHITECTURE.md): ``zoo_build`` re-makes the
zoo from its recipes, ``zoo_quality`` measures a zoo's models on the first toy-val images."""
