"""Example third-party blocks and tasks for mad-search (registered through the
``mad_search.blocks`` and ``mad_search.tasks`` entry-point groups in ``pyproject.toml``;
nothing to import by hand)."""
