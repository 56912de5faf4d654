"""Data: sources (user files), corpora (packaged real data), shards, loaders."""
