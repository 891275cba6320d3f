"""Evaluation: held_out (the eval loss, and exact match, Rouge-L and the other registered metrics
per family, on the held-out split), metrics (the metric registry) and harness (lm-eval tasks and
runs)."""
