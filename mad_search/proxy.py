"""Optuna's gRPC storage proxy in front of the study database:

    python -m mad_search.proxy [STORAGE_URL] [--host 0.0.0.0] [--port 13000]

Coordinators then use ``study.storage=grpc://HOST:PORT``: one process holds the database
connections (a small pool) instead of every machine holding its own. ``STORAGE_URL`` defaults to
the environment variable ``MAD_SEARCH_STORAGE`` (keeps a password off the command line); the URL
is printed with its password masked. Heartbeats are not relayed by the proxy (Optuna's
``GrpcStorageProxy`` is not a heartbeat storage): coordinators behind it record none, so a trial of
a coordinator killed behind the proxy is failed by one that connects to the database directly.
"""

from __future__ import annotations

import argparse
import os
import sys

from mad_search.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mad_search.proxy", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("storage", nargs="?", default=os.environ.get("MAD_SEARCH_STORAGE"),
                        help="database URL (default: $MAD_SEARCH_STORAGE)")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=13000)
    args = parser.parse_args(argv)
    from mad_search.storage import StudyStorage, grpc_address, mask_url

    try:
        if not args.storage:
            raise UserError("give a database URL or set MAD_SEARCH_STORAGE")
        if grpc_address(args.storage) is not None:
            raise UserError("the proxy needs a database URL, not another proxy")
        storage = StudyStorage(args.storage).open()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    print(
        f"storage proxy for {mask_url(args.storage)} on grpc://{args.host}:{args.port}",
        flush=True,
    )
    try:
        optuna.storages.run_grpc_proxy_server(storage, host=args.host, port=args.port)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
