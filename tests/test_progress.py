"""Progress bars: drawn on a terminal; silent for quick loops and transient bars when piped."""

from __future__ import annotations

import io

import pytest

import pyfuse.progress
from pyfuse.progress import progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_the_bar():
    out = _Terminal()
    for _ in progress_bar(range(3), desc="ties: thresholds", leave=False, file=out):
        pass
    assert "ties: thresholds" in out.getvalue() and "0%" in out.getvalue()


def test_piped_quick_and_transient_bars_print_nothing():
    out = io.StringIO()
    for _ in progress_bar(range(3), desc="ties: thresholds", leave=False, file=out):
        pass
    for _ in progress_bar(range(3), desc="merging", file=out):
        pass
    assert out.getvalue() == ""


def test_piped_values_shown_at_every_step_print_nothing_for_a_quick_loop():
    """A loss set on every step (fine-tuning, the adaptive loop) waits for the throttled redraw."""
    out = io.StringIO()
    bar = progress_bar(range(50), desc="fine-tune", file=out)
    for step in bar:
        bar.set_postfix(loss=f"{step:.3f}")
    assert out.getvalue() == ""
    terminal = _Terminal()
    bar = progress_bar(range(3), desc="fine-tune", file=terminal)
    for step in bar:
        bar.set_postfix(loss=f"{step:.3f}")
    bar.close()
    assert "loss=2.000" in terminal.getvalue()  # on a terminal the value still shows


def test_piped_long_bars_print_sparse_lines(monkeypatch):
    monkeypatch.setattr(pyfuse.progress, "PIPED_INTERVAL", 0.0)  # every update is "long enough"
    out = io.StringIO()
    bar = progress_bar(total=4, desc="fine-tune", file=out, miniters=1)
    for _ in range(4):
        bar.update()
    bar.close()
    assert "fine-tune" in out.getvalue() and "4/4" in out.getvalue()
    assert progress_bar(range(2), file=out).mininterval == 0.0


@pytest.mark.parametrize("stream", [_Terminal(), io.StringIO()])
def test_disable_wins(stream):
    for _ in progress_bar(range(3), desc="x", file=stream, disable=True):
        pass
    assert stream.getvalue() == ""


def test_a_piped_ties_merge_leaves_no_progress_lines(capsys):
    import torch

    import pyfuse

    generator = torch.Generator().manual_seed(0)
    base = {f"layer{i}.weight": torch.randn(8, 8, generator=generator) for i in range(3)}
    finetuned = [{k: v + 0.1 * torch.randn(v.shape, generator=generator) for k, v in base.items()} for _ in range(2)]
    merged = pyfuse.merge("ties", base, finetuned, density=0.5, progress=True)
    assert set(merged) == set(base)
    assert capsys.readouterr().err == ""  # capsys's stderr is not a terminal, like a pipe
