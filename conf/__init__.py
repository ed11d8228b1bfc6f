"""mad-search's Hydra config tree, shipped as package data (``pkg://conf``)."""
