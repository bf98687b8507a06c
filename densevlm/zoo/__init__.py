"""Pre-trained toy CLIPs shipped with the package (see :mod:`densevlm.zoo.registry`)."""

from densevlm.zoo.registry import (
    ZooEntry,
    ZooError,
    architecture,
    get_entry,
    is_zoo_name,
    list_models,
    load_manifest,
    weights_path,
)

__all__ = ["ZooEntry", "ZooError", "architecture", "get_entry", "is_zoo_name", "list_models", "load_manifest",
           "weights_path"]
