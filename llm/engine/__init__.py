"""The seam to DeepSpeed: the package that owns `import deepspeed` (enforced by
tests/unit/test_layering.py; `model/pipeline.py` may use DeepSpeed's public LayerSpec). It sits
between the parallel primitives and the model: torch.distributed set up through DeepSpeed's comm
layer (`comm`), the DeepSpeed config dict derived from ours (`deepspeed_config`), the engine built
around a model (`build`), DeepSpeed's pipeline grid inside DiLoCo islands (`pipeline_grid`), its
stage partitioners for the planner (`partition`), ZeRO state through its public helpers (`zero`),
its `mpu` protocol over the mesh's process groups (`mpu`).

Not yet here (the mesh-and-seam issue): the private engine and optimizer attributes that
checkpoint.engine, checkpoint.reshard and training.diloco read on engine objects (behind the
tested-version guard in checkpoint.compat), and the mpu as an adapter over the mesh."""
