"""trimkv."""
