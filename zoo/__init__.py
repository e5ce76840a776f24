"""Zarr-backed checkpoint zoo: store, safe ingestion, population builder, queries."""
from zoo.store import Checkpoint, Zoo, ZooError, checkpoint_id, open_zoo, validate_tensors

__all__ = ["Checkpoint", "Zoo", "ZooError", "checkpoint_id", "open_zoo", "validate_tensors"]
