"""community-edge: the gateway daemon (model, config, sources, pipeline, CLI)."""
