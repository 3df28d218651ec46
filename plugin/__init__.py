"""The cellgate agent: runtime edges (Docker, REST, CLI), use cases and the composition root."""
