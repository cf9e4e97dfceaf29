"""Online drafter learning: traces from verification, a trainer process, versioned checkpoints, gated hot swaps.

traces.py (what verification records; buffers), arena.py (the buffers' fixed, preallocated storage),
channel.py (engine -> trainer queue, never blocking), objective.py (TTT unroll, forward KL, discard term;
held-out simulated acceptance), recompute.py (prompt hidden states from aux states), trainer.py (the trainer
and its process), publish.py (atomic versions, manifests, export), swap.py (validation, gate, live monitor,
rollback), online.py (``start_online_learning``), commands.py (``onspec warmup``, ``onspec export-speculator``).
"""
