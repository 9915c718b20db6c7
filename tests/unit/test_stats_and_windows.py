import pytest

from loadtest.stats import RequestRecord, percentile, summarize
from serving.metrics import merge_expositions


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


def test_engine_metrics_get_a_backend_label_and_one_header_per_family():
    text = ("# HELP a_total x\n# TYPE a_total counter\na_total 1.0\nb{engine=\"0\"} 2.0\n"
            "# HELP h y\n# TYPE h histogram\nh_bucket{le=\"1\"} 1.0\nh_count 1.0\n")
    merged = merge_expositions([("m1", text), ("m2", text)])
    lines = merged.splitlines()
    assert lines.count("# HELP a_total x") == 1 and lines.count("# TYPE h histogram") == 1
    assert 'a_total{backend="m1"} 1.0' in lines and 'b{backend="m2",engine="0"} 2.0' in lines
    # each family's samples from both engines sit together under its one header
    assert lines.index('a_total{backend="m2"} 1.0') < lines.index("# HELP h y") < lines.index('h_bucket{backend="m1",le="1"} 1.0')
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(merged)}
    assert len(families["h"].samples) == 4 and {s.labels["backend"] for s in families["a"].samples + families["b"].samples} == {"m1", "m2"}
    assert merge_expositions([]) == ""
