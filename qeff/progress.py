"""Progress for work that has no finer-grained progress of its own (export, compile, verify)."""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager

__all__ = ["stage"]


@contextmanager
def stage(description: str, *, enabled: bool = True):
    """Progress for work with no finer-grained progress: a running clock on a terminal; in logs
    (stderr not a TTY) one line when it starts and one when it ends."""
    if not enabled:
        yield
        return
    start = time.perf_counter()
    if not sys.stderr.isatty():
        print(f"{description} …", file=sys.stderr, flush=True)
        yield
        print(f"{description}: done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=None, desc=description, bar_format="{desc}: {elapsed}", file=sys.stderr, leave=True)
    done = threading.Event()

    def tick():
        while not done.wait(0.5):
            bar.refresh()

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        bar.close()
