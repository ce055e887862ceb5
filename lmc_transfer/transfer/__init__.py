"""Engine side: moving KV between GPU slots and host slabs (transfer paths, layerwise scheduling)."""
