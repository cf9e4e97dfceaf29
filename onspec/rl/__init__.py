"""RL mode: GRPO on tasks with verifiable rewards, rollouts through the engine with lossless speculation.

tasks.py (reasoning-gym prompts + rewards), rollout.py (global buffer, Seer scheduling, divided rollout,
grouped drafting), forward.py (differentiable causal forward of the engine's model class), grpo.py (the
policy update), cotrain.py (TLT drafter co-training), loop.py (the RL loop), plots.py, commands.py
(``onspec rl``). Multi-worker rollouts over Ray live in ``onspec.distributed``.
"""
