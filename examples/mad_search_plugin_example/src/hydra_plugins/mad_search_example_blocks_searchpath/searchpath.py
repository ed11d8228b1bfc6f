"""Puts this package's config groups (``task/token_reversal.yaml``...) on Hydra's config search
path, so ``python -m mad_search task=token_reversal`` works once the package is installed.

Hydra imports every module under the ``hydra_plugins`` namespace package when an app starts and
calls each SearchPathPlugin (Hydra's "Config Search Path Plugin"). Appended last, these files
never shadow mad-search's own configs. Without this plug-in, pass
``hydra.searchpath=[pkg://mad_search_example_blocks.conf]`` on the command line instead.
"""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class MadSearchExampleSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="mad-search-example-blocks",
                           path="pkg://mad_search_example_blocks.conf")
