"""Example third-party blocks for mad-search (registered through the ``mad_search.blocks``
entry-point group in ``pyproject.toml``; nothing to import by hand)."""
