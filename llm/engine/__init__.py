"""The seam to DeepSpeed: the one package meant to own every `import deepspeed` and every access to
its internals, behind the tested-version guard (issue: one mesh, one seam). What lives here so far:
the DeepSpeed config dict derived from our config (`deepspeed_config`). Still outside, listed in
tests/unit/test_layering.py until they move: the engine build (training.pretrain), checkpoint
internals (checkpoint.engine, reshard, merge), DeepSpeed's comm init and pipeline topology
(parallel.context, parallel.pipe_grid), its partitioner (planner.memory)."""
