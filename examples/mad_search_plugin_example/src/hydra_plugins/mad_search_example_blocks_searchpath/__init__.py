"""Hydra plug-in of mad-search-example-blocks: puts its config groups on the search path."""
