"""The full-size sandbox quickstart with fixed seeds: alignment must really work (a few minutes).

The thresholds are those this build reaches with margin; the issue's targets (win rate >= 0.80 at
KL <= 6, quickstart <= 3 minutes) are not all reached yet, see benchmarks/RESULTS.md.
"""

import pytest

from alignment.sandbox.quickstart import QuickstartConfig, run


@pytest.mark.slow
def test_quickstart_aligns_the_policy(tmp_path):
    results = run(QuickstartConfig(), tmp_path, log=lambda s: None)
    assert results["reward_model"]["gold_accuracy"] >= 0.78
    sft = results["sft"]
    assert sft["eval/banned_word_rate"] > 0.15  # the SFT model is a real mixture
    for method in ("dpo", "ppo"):
        m = results[method]
        assert m["eval/gold_win_rate"] >= 0.65, (method, m)
        assert m["eval/gold_reward_mean"] > sft["eval/gold_reward_mean"] + 1.0, (method, m)
        assert m["eval/kl"] <= 8.0, (method, m)
        assert m["eval/banned_word_rate"] <= sft["eval/banned_word_rate"] / 5, (method, m)
        # the reward-KL curve has its points, each away from the reference
        assert len(results["curves"][method]) == 3
        assert all(p["eval/kl"] > 0.5 for p in results["curves"][method])
