import math

import pytest

from loadtest.perplexity import _prompt_logprobs, make_windows
from loadtest.client import EndpointError
from loadtest.stats import RequestRecord, percentile, summarize
from serving.metrics import label_exposition


def test_percentile_interpolates_like_numpy():
    values = [1.0, 2.0, 3.0, 4.0]
    assert percentile(values, 50) == 2.5
    assert percentile(values, 90) == pytest.approx(3.7)
    assert percentile([], 50) is None
    assert summarize([2.0, 4.0])["mean"] == 3.0


def test_tpot_excludes_the_first_token():
    record = RequestRecord(ok=True, output_tokens=5, ttft=0.2, e2e=1.0)
    assert record.tpot == pytest.approx(0.2)
    assert RequestRecord(ok=True, output_tokens=1, ttft=0.2, e2e=0.2).tpot is None


def test_windows_are_non_overlapping_and_drop_the_short_tail():
    windows = make_windows(list(range(10)), 4, None)
    assert windows == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert make_windows(list(range(10)), 4, 1) == [[0, 1, 2, 3]]


def test_prompt_logprobs_skip_the_unscored_first_token():
    body = {"choices": [{"logprobs": {"token_logprobs": [None, -1.0, -2.0, -0.5]}}]}
    assert _prompt_logprobs(body) == [-1.0, -2.0, -0.5]
    nll = 3.5 / 3
    assert math.exp(nll) == pytest.approx(math.exp(-sum(_prompt_logprobs(body)) / 3))


def test_missing_prompt_logprobs_says_what_is_needed():
    with pytest.raises(EndpointError, match="echo"):
        _prompt_logprobs({"choices": [{"logprobs": None}]})


def test_engine_metrics_get_a_backend_label_and_one_header():
    seen: set[str] = set()
    text = "# HELP a x\n# TYPE a counter\na_total 1.0\nb{engine=\"0\"} 2.0\n"
    first = label_exposition(text, "m1", seen)
    second = label_exposition(text, "m2", seen)
    assert 'a_total{backend="m1"} 1.0' in first and 'b{backend="m1",engine="0"} 2.0' in first
    assert "# HELP" not in second and 'a_total{backend="m2"} 1.0' in second
