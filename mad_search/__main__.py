"""``python -m mad_search``: the Hydra entry point.

With a sweep (``+sweep=layer_patterns``) it runs an Optuna study whose trials train concurrently
as Hogwild workers. With ``+protocol=mad`` it runs the MAD protocol for one layer sequence through
the same pool and writes ``mad_score.json``; with both, each sweep trial is scored by the
protocol level. Without either it trains one layer sequence on one task and writes
``results.json`` into the run directory. User errors print one line (``error: ...``) and exit
with status 2.
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="pkg://conf", config_name="config")
def main(cfg: DictConfig) -> dict | None:
    from mad_search.config import resolve
    from mad_search.errors import RunDirError, UserError
    from mad_search.hogwild.one_model import HogwildFailed
    from mad_search.hogwild.pool import WorkerStartError
    from mad_search.storage import StorageLost, scrub_run_dir

    out_dir = HydraConfig.get().runtime.output_dir
    scrub_run_dir(out_dir)  # Hydra saved the overrides as typed: no password stays there
    try:
        if cfg.get("search") is not None and cfg.get("protocol") is not None:
            from mad_search.protocol_run import run_protocol_sweep

            return run_protocol_sweep(cfg, out_dir)
        if cfg.get("search") is not None:  # a sweep: +sweep=<name>
            from mad_search.study import run_study

            return run_study(cfg, out_dir)
        if cfg.get("protocol") is not None:  # the MAD protocol: +protocol=mad
            from mad_search.protocol_run import run_protocol

            return run_protocol(cfg, out_dir)
        from mad_search.run import run_single

        return run_single(resolve(cfg), out_dir)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except (WorkerStartError, StorageLost, RunDirError, HogwildFailed) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
