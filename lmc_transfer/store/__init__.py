"""The CacheStore contract, the slab pool, and its two homes: in-process (IP) and the daemon's client (MP)."""
