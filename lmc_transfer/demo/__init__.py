"""``lmc-transfer demo``: a toy engine serving multi-turn chats through the cache, every byte checked."""
