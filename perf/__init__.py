"""Side-by-side benchmark harness (not part of the tandem distribution)."""
