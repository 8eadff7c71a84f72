"""Worker processes' signs of life: `custody risk` and `custody notify` beat after each pass."""
