"""Distributed rollouts: Ray actors that each own an engine (worker.py), the coordinator that feeds them from
one global buffer (coordinator.py), and the ``RolloutBackend`` the RL loop uses (backend.py)."""
