"""Reporting: report (the run log, summary, HTML report, `fedllm compare` and `fedllm ledger`) and
tracking (the experiment trackers' registry)."""
