"""The seam to DeepSpeed: the package that owns `import deepspeed` (enforced by
tests/unit/test_layering.py). Here: the DeepSpeed config dict derived from ours (`deepspeed_config`),
the engine built around a model (`build`), DeepSpeed's stage partitioners for the planner
(`partition`), ZeRO state through DeepSpeed's public helpers (`zero`).

Not yet here (the mesh-and-seam issue): DeepSpeed's comm init and pipeline grid (parallel.context,
parallel.pipe_grid, one layer below: they move with the mesh), and the private engine and optimizer
attributes that checkpoint.engine, checkpoint.reshard and training.diloco read on engine objects
(behind the tested-version guard in checkpoint.compat)."""
