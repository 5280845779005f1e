"""backends: executors and code generators for tile programs."""
