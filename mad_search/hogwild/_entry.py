"""The target a worker process is spawned with. It lives apart from :mod:`worker` so that starting
a pool does not import torch (pickling the target by name imports only this module); the child
then imports torch and the trial code."""


def worker_entry(slot: int, conn, threads: int) -> None:
    from mad_search.hogwild.worker import worker_main

    worker_main(slot, conn, threads)
