"""Step 6 of an iteration, and the run's results: every model against the baselines.

`evaluate` (greedy answers, judged), `refusal` (the detector), `validation`
(held-out seeds that choose the run's model), `holdout` (held-out seeds that
score every model), `report` (report.md and report.png), `frontier` (the run's
model against training-matched SFT, and one draw among others).
"""
