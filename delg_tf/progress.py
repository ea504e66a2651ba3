"""Progress bars for long loops: tqdm when installed (extra `progress`), else log lines."""

import sys
import time

# Without tqdm: one line at most every this many seconds (and at the end).
FALLBACK_INTERVAL_S = 10.0


def _plain_progress(items, desc, unit, total):
    start = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= FALLBACK_INTERVAL_S:
            last = now
            of = f"/{total}" if total is not None else ""
            print(f"{desc}: {done}{of} {unit} ({now - start:.0f} s)", file=sys.stderr, flush=True)
    of = f"/{total}" if total is not None else ""
    print(
        f"{desc}: {done}{of} {unit} done in {time.monotonic() - start:.1f} s",
        file=sys.stderr,
        flush=True,
    )


def progress_bar(items, desc, unit="it", enabled=True, total=None):
    """Wraps an iterable with a progress display.

    Args:
      items: the iterable.
      desc: label shown before the counter.
      unit: what one item is ("img", "query").
      enabled: False returns `items` unchanged.
      total: number of items when `items` has no len().

    Returns:
      An iterable yielding the same items.
    """
    if not enabled:
        return items
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    try:
        from tqdm import tqdm
    except ImportError:
        return _plain_progress(items, desc, unit, total)
    return tqdm(items, desc=desc, unit=unit, total=total)


def progress_wrapper(desc, unit="it", enabled=True):
    """A one-argument wrapper (``items -> iterable``) for APIs taking `progress=`, or None."""
    if not enabled:
        return None
    return lambda items: progress_bar(items, desc, unit)
