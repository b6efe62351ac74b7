"""Progress for work that has no finer-grained progress of its own (export, compile, verify)."""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager

__all__ = ["stage", "layer_progress", "decoder_layers"]


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


def decoder_layers(model) -> list:
    """The model's decoder layers: its longest ``nn.ModuleList`` (``model.layers``, ``h``, …)."""
    import torch

    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


@contextmanager
def layer_progress(description: str, model, *, passes: int = 1, enabled: bool = True):
    """Per-layer progress with an ETA while ``model`` runs ``passes`` forward passes (issue 18: a
    1B export was 147 s of one silent line). Each decoder layer's forward ticks the bar — tracing
    for the export, each generated token for verification. On a terminal a tqdm bar; in logs one
    line per tenth done, with the estimated time left. More passes than announced extend it."""
    layers = decoder_layers(model) if enabled else []
    if not layers:
        yield
        return
    total = len(layers) * max(1, passes)
    start = time.perf_counter()
    tty = sys.stderr.isatty()
    bar = None
    if tty:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=description, unit="layer", file=sys.stderr, leave=False)
    state = {"done": 0, "reported": 0}

    def tick(module, args):
        state["done"] += 1
        if bar is not None:
            if state["done"] > bar.total:
                bar.total = state["done"]
            bar.update(1)
            return
        tenth = min(10, state["done"] * 10 // total)
        if tenth > state["reported"]:
            state["reported"] = tenth
            elapsed = time.perf_counter() - start
            left = elapsed * (total - state["done"]) / state["done"]
            print(f"{description}: {state['done']}/{total} layer passes, {elapsed:.0f} s, about {left:.0f} s left",
                  file=sys.stderr, flush=True)

    handles = [layer.register_forward_pre_hook(tick) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        if bar is not None:
            bar.close()
