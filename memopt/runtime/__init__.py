"""Lowering a Plan: the returned model, and the eager and compiled executions of its training step.

``optimized`` — the module ``memopt.optimize`` returns; ``partition`` — the Plan's decisions as
selective-checkpoint tags on the joint graph, torch's partitioner, offload nodes; ``step`` — one
traced step per input signature; ``eager`` / ``compiled`` — the graphs run op by op or compiled by
Inductor; ``fingerprint`` — what a Plan is checked against before it is applied.
"""
