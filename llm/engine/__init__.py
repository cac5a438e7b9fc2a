"""The seam to DeepSpeed: the package that owns `import deepspeed` and every read of DeepSpeed's
private attributes (both enforced by tests/unit/test_layering.py; `model/pipeline.py` may use
DeepSpeed's public LayerSpec). It sits between the parallel primitives and the model:
torch.distributed set up through DeepSpeed's comm layer (`comm`), the DeepSpeed config dict derived
from ours and the run's optimizer plan (`deepspeed_config`), the engine built around a model
(`build`), DeepSpeed's pipeline grid inside DiLoCo islands (`pipeline_grid`), its stage partitioners
for the planner (`partition`), ZeRO state through its public helpers (`zero`), its `mpu` protocol
over the mesh's process groups (`mpu`), and the engine internals checkpoints and DiLoCo need
(`internals`), behind the tested-version guard (`compat`)."""
