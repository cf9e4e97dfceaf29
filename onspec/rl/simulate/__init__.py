"""Rollout scheduling at cluster scale, by simulation (``onspec simulate-rollout``).

Why: a 2-core machine runs one or two rollout workers, while Seer's scheduling (arXiv 2511.14617) and
TLT's tail (arXiv 2511.16665) are about tens to hundreds of them. The simulator runs onspec's real rollout
``Coordinator`` (``onspec/rl/rollout.py``) against a discrete-event model of N engines whose step costs,
response lengths and acceptance are measured or stated, and reports makespan, tail and utilisation.

* ``cost``: seconds per engine step (a measured or file table, or a linear model);
* ``workload``: response lengths (recorded or a heavy-tailed distribution) and acceptance by strategy;
* ``events``: the discrete-event model of the workers around the real Coordinator;
* ``sweep``: policies x cluster sizes;
* ``report``: table, JSONL/JSON and PNG;
* ``commands``: the CLI.
"""
