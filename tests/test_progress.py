"""Progress display: tqdm when available, plain log lines otherwise, nothing when off."""

import builtins

from delg_tf import progress


def test_disabled_returns_the_items_unchanged():
    items = [1, 2, 3]
    assert progress.progress_bar(items, "x", enabled=False) is items
    assert progress.progress_wrapper("x", enabled=False) is None


def test_without_tqdm_falls_back_to_log_lines(monkeypatch, capsys):
    real_import = builtins.__import__

    def no_tqdm(name, *args, **kwargs):
        if name == "tqdm":
            raise ImportError("no tqdm")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    assert list(progress.progress_bar(range(4), "extract", "img")) == [0, 1, 2, 3]
    assert "extract: 4/4 img done" in capsys.readouterr().err


def test_wrapper_yields_every_item():
    wrap = progress.progress_wrapper("re-rank", "query")
    assert list(wrap(["a", "b"])) == ["a", "b"]
