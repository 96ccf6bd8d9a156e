"""Data phase: sources, the prepare stage, data versioning, newly labelled samples."""
