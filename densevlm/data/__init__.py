"""Image sources, transforms and datasets (captions, grid boxes, panoptic evaluation)."""
