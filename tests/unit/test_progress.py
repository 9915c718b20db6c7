"""Progress written to a file or a CI log: a few whole lines and the final count, not one line per update."""

from __future__ import annotations

import asyncio
import io

from core.progress import LineProgress, finish, progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_hundred_steps_into_a_file_write_a_line_per_tenth_and_the_final_count():
    out = io.StringIO()
    bar = progress(total=100, desc="windows", file=out)
    for _ in range(100):
        bar.update(1)
    bar.close()
    bar.close()  # closing twice writes nothing more
    lines = out.getvalue().splitlines()  # splits on "\r" too, as a CI log shows tqdm's redraws
    assert 9 <= len(lines) <= 12, lines
    assert lines[0].startswith("windows: 10/100 it (10 %)")
    assert lines[-1].startswith("windows: 100/100 it (100 %)") and lines[-1].endswith("done")
    assert "\r" not in out.getvalue()


def test_without_a_total_the_clock_paces_the_lines():
    out, clock = io.StringIO(), Clock()
    bar = LineProgress(total=None, desc="run", unit="req", file=out, clock=clock)
    for _ in range(100):  # one update every 2 s: a line every 30 s, not every update
        clock.now += 2.0
        bar.update(1)
    bar.set_postfix_str("errors 0")
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 200 // 30 + 1, lines
    assert lines[0] == "run: 15 req, 30.0 s" and lines[-1] == "run: 100 req, 200.0 s, errors 0, done"


def test_a_slow_step_is_reported_within_thirty_seconds_even_before_a_tenth_is_done():
    out, clock = io.StringIO(), Clock()
    bar = LineProgress(total=1000, file=out, clock=clock)
    bar.update(1)
    clock.now = 31.0
    bar.update(1)
    assert out.getvalue().splitlines() == ["2/1,000 it (0 %), 31.0 s"]


def test_a_terminal_gets_a_live_tqdm_bar_and_a_disabled_bar_writes_nothing():
    from tqdm import tqdm

    term = Terminal()
    bar = progress(total=3, desc="x", file=term)
    assert isinstance(bar, tqdm)
    bar.close()
    quiet = io.StringIO()
    bar = progress(total=3, file=quiet, disable=True)
    bar.update(3)
    bar.close()
    assert quiet.getvalue() == ""


def test_iterating_and_a_failed_job_in_a_log():
    out = io.StringIO()
    assert list(progress(range(5), desc="items", file=out)) == [0, 1, 2, 3, 4]
    assert out.getvalue().splitlines()[-1].startswith("items: 5/5 it (100 %)")
    failed = io.StringIO()
    bar = progress(total=100, file=failed)
    bar.update(1)
    finish(bar, failed=True)  # the error that follows is the last line, not a progress line
    assert failed.getvalue() == ""


def test_the_evaluation_client_reports_sparsely_into_a_log(capsys):
    from accuracy.perplexity import gather_limited

    async def job() -> int:
        return 1

    assert asyncio.run(gather_limited([job] * 100, 4, "windows", progress=True)) == [1] * 100
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) <= 12 and lines[-1].startswith("windows: 100/100"), lines


def test_the_load_tester_reports_sparsely_into_a_log(capsys):
    from loadtest.runner import _Progress
    from loadtest.stats import RequestRecord

    bar = _Progress(True, "concurrency 8", 100)
    for i in range(100):
        bar(RequestRecord(ok=i % 50 != 0, index=i, start=0.0, output_tokens=4))
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) <= 12, lines
    assert lines[-1].startswith("concurrency 8: 100/100 req") and "errors 2, 400 output tokens" in lines[-1]
