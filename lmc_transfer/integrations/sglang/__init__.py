"""SGLang bridges: the radix-cache backend plugin (0.5.23) and LMCache-compatible connectors (0.5.20)."""
