import pytest

from loadtest.stats import RequestRecord, percentile, summarize
from serving.metrics import label_exposition


def test_percentile_interpolates_like_numpy():
    values = [1.0, 2.0, 3.0, 4.0]
    assert percentile(values, 50) == 2.5
    assert percentile(values, 90) == pytest.approx(3.7)
    assert percentile([], 50) is None
    assert summarize([2.0, 4.0])["mean"] == 3.0


def test_tpot_excludes_the_first_token():
    record = RequestRecord(ok=True, output_tokens=5, ttft=0.2, e2e=1.0, chunk_times=[0.2, 0.4, 0.6, 0.8, 1.0])
    assert record.tpot == pytest.approx(0.2)
    assert RequestRecord(ok=True, output_tokens=1, ttft=0.2, e2e=0.2, chunk_times=[0.2]).tpot is None
    # one chunk (a non-streamed answer) says nothing about the time per token
    assert RequestRecord(ok=True, output_tokens=5, ttft=1.0, e2e=1.0, chunk_times=[1.0]).tpot is None


def test_engine_metrics_get_a_backend_label_and_one_header():
    seen: set[str] = set()
    text = "# HELP a x\n# TYPE a counter\na_total 1.0\nb{engine=\"0\"} 2.0\n"
    first = label_exposition(text, "m1", seen)
    second = label_exposition(text, "m2", seen)
    assert 'a_total{backend="m1"} 1.0' in first and 'b{backend="m1",engine="0"} 2.0' in first
    assert "# HELP" not in second and 'a_total{backend="m2"} 1.0' in second
