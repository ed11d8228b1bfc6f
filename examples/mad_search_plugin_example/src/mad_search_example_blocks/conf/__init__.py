"""Config groups for mad-search's Hydra app (``task/<name>.yaml``), found as
``pkg://mad_search_example_blocks.conf``."""
