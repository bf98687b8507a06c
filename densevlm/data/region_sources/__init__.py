"""Region sources: where the regions DenseVLM and CLIPSelf align (and ``densevlm labels`` names) come from.

A registry (:data:`REGION_SOURCES`, :func:`register_region_source`) from ``data.regions.kind`` to a builder:
``grid`` (the reference's random cells), ``boxes`` (a COCO json of boxes or proposals), ``masks`` (COCO RLE /
polygons, SAM-style mask files, panoptic PNG segments). Adding a source is one module registering its builder.
"""

from densevlm.data.region_sources import files as _files, grid as _grid  # noqa: F401  (they register)
from densevlm.data.region_sources.base import (REGION_SOURCES, GridSpec, ImageRegions, RegionSource,
                                               RegionSourceError, boxes_on_canvas, build_region_source,
                                               describe_identity, masks_on_grid, region_identity,
                                               regions_on_canvas, register_region_source)

__all__ = ["REGION_SOURCES", "GridSpec", "ImageRegions", "RegionSource", "RegionSourceError", "boxes_on_canvas",
           "build_region_source", "describe_identity", "masks_on_grid", "region_identity", "regions_on_canvas",
           "register_region_source"]
