"""Sources: each owns its connection and hands decoded readings to the pipeline."""
