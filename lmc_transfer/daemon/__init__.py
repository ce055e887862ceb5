"""The MP cache daemon: server loop, wire protocol, shared-memory segment, tier promotion."""
