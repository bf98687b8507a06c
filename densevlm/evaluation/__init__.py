"""Evaluators (detectron2's reset / process / evaluate shape) and metric tables."""
