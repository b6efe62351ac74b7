"""The peak memory of a child process, for the tests that bound what a stage holds (issue 18).

``SAMPLER`` is Python source a test puts at the top of its child program: ``rss()`` reads the
process's anonymous resident memory, and ``start_sampling()`` returns it as the baseline and keeps
the largest value since in ``top[0]``, from a thread that samples every 2 ms. Anonymous memory
only: the libraries' file pages and a memory-mapped weights or ONNX data file, which the kernel may
evict before the baseline and fault back in during the stage when the machine is busy (a full
`make test` read 1.79x-1.98x of a streamed export that way), are not the stage's memory.
"""

SAMPLER = '''
import threading as _threading, time as _time
from pathlib import Path as _Path


_fields = ("RssAnon:",)


def rss():
    return sum(int(line.split()[1]) * 1024 for line in _Path("/proc/self/status").read_text().splitlines()
               if line.startswith(_fields))


top = [0]


def start_sampling(period=0.002, fields=("RssAnon:",)):
    """The baseline now; from here on a daemon thread keeps the peak in top[0]. ``fields``: the
    /proc/self/status lines summed (add "RssFile:" where mapped weights are the stage's own)."""
    global _fields
    _fields = tuple(fields)

    def sample():
        while True:
            top[0] = max(top[0], rss())
            _time.sleep(period)
    base = rss()
    _threading.Thread(target=sample, daemon=True).start()
    return base

'''
