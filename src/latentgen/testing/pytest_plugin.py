"""pytest fixtures for plugin authors (filled in below)."""
