"""The typed configuration tree: one dataclass per section, Megatron's names, the choices as
`Literal`s, derived values as properties. YAML files mirror it (loading.py); validation.py rules on
the values; the DeepSpeed dict is derived from it in the seam (llm/engine/deepspeed_config.py)."""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from llm.config.batches import BatchSchedule
from llm.errors import LLMError

Architecture = Literal["gpt2", "llama"]
Precision = Literal["auto", "fp32", "bf16", "fp16", "fp8"]
RunPrecision = Literal["fp32", "bf16", "fp16"]  # auto settled (resolve_precision)
DecayStyle = Literal["cosine", "linear", "constant", "WSD"]
WSDDecayStyle = Literal["linear", "cosine", "exponential", "minus_sqrt"]
WandbMode = Literal["auto", "online", "offline", "disabled"]
PartitionMethod = Literal["parameters", "uniform", "type:TransformerBlock"]
Optimizer = Literal["adamw", "sgd", "muon"]
MuonScale = Literal["rms", "shape"]
Exchange = Literal["fp32", "bf16", "fp16", "int8", "int4"]
CommDtype = Literal["fp32", "bf16", "fp16"]
RouterScore = Literal["softmax", "sigmoid"]
LoadBalancing = Literal["aux_loss", "seq_aux_loss", "none"]
CPCommType = Literal["p2p", "a2a"]


class ConfigError(LLMError, ValueError):
    """A user mistake in the configuration; the message names the setting and the fix."""


@dataclass
class ModelConfig:
    architecture: Architecture = "gpt2"
    num_layers: int = 12
    hidden_size: int = 768
    num_attention_heads: int = 12
    num_query_groups: int | None = None  # llama GQA; None = num_attention_heads (MHA)
    ffn_hidden_size: int | None = None  # None = 4h (gpt2) or 8h/3 rounded up to 256 (llama)
    seq_length: int = 1024
    max_position_embeddings: int | None = None  # None = seq_length
    vocab_size: int | None = None  # None = taken from the tokenizer
    make_vocab_size_divisible_by: int = 128
    dropout: float = 0.0
    attention_dropout: float = 0.0
    tie_embeddings: bool | None = None  # None = True for gpt2, False for llama
    activation_checkpointing: bool = False
    sequence_parallel: bool = False
    # The LM head and the loss over chunks of this many tokens (None: all at once): the fp32 logits of
    # one chunk exist at a time instead of (tokens x vocabulary), recomputed in backward
    loss_chunk_tokens: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02
    # x + attn(norm(x)) + mlp(norm(x)) (GPT-J, PaLM): one tensor-parallel reduction per layer
    parallel_block: bool = False
    parallel_block_norms: int = 1  # 2: GPT-NeoX's form, attention and MLP each with its own norm
    compile: bool = False  # torch.compile each transformer block
    # Mixture of experts (Megatron's names); num_experts None = a dense model
    num_experts: int | None = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: int | None = None  # per expert; None = ffn_hidden_size (fine-grained: smaller)
    moe_shared_expert_intermediate_size: int | None = None  # always-on shared experts (DeepSeek, Qwen); None = none
    moe_layer_freq: int | list[int] = 1  # k: blocks 0, k, 2k, ... are MoE; or a 0/1 per block (dense first blocks)
    moe_router_score_function: RouterScore = "softmax"
    moe_router_load_balancing_type: LoadBalancing = "aux_loss"
    moe_aux_loss_coeff: float = 0.01
    moe_z_loss_coeff: float = 0.0
    # DeepSeek-V3's auxiliary-loss-free balancing: a per-expert bias, used for selection only, moved
    # by moe_router_bias_update_rate towards an even load after every step
    moe_router_enable_expert_bias: bool = False
    moe_router_bias_update_rate: float = 1e-3
    moe_expert_capacity_factor: float | None = None  # None = dropless; a number = tokens per expert x this

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None

    @property
    def moe_layers(self) -> list[int]:
        """The blocks whose MLP is a mixture of experts (none for a dense model)."""
        if self.num_experts is None:
            return []
        freq = self.moe_layer_freq
        if isinstance(freq, list):
            return [i for i, flag in enumerate(freq) if flag]
        return [i for i in range(self.num_layers) if i % freq == 0]

    @property
    def moe_ffn_size(self) -> int:
        return self.moe_ffn_hidden_size or self.ffn_size

    @property
    def kv_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        if self.architecture == "llama":
            return 256 * math.ceil(8 * self.hidden_size / 3 / 256)
        return 4 * self.hidden_size

    @property
    def max_positions(self) -> int:
        return self.max_position_embeddings or self.seq_length

    @property
    def tied(self) -> bool:
        if self.tie_embeddings is None:
            return self.architecture == "gpt2"
        return self.tie_embeddings

    @property
    def is_llama(self) -> bool:
        return self.architecture == "llama"

    def padded_vocab_size(self, tensor_parallel_size: int = 1) -> int:
        if self.vocab_size is None:
            raise ConfigError("model.vocab_size is unknown: set it or set data.tokenizer")
        multiple = self.make_vocab_size_divisible_by * tensor_parallel_size
        return multiple * math.ceil(self.vocab_size / multiple)


@dataclass
class SpikeDetectionConfig:
    """A loss spike: non-finite, or (once `window` losses are known) above both mean + num_std x std
    and min_ratio x mean of the last `window` iterations."""

    window: int = 50  # 0 = only non-finite losses count as spikes
    num_std: float = 6.0
    min_ratio: float = 1.5


@dataclass
class TrainConfig:
    train_iters: int = 1000
    micro_batch_size: int = 4
    global_batch_size: int = 32
    lr: float = 3.0e-4
    min_lr: float = 3.0e-5
    lr_warmup_iters: int = 100
    lr_decay_iters: int | None = None  # None = train_iters
    lr_decay_style: DecayStyle = "cosine"
    # WSD (warmup-stable-decay): the rate stays at lr after warmup and decays to min_lr over the last
    # lr_wsd_decay_iters iterations of the decay length (None: lr_wsd_decay_fraction of it)
    lr_wsd_decay_iters: int | None = None
    lr_wsd_decay_fraction: float = 0.2
    lr_wsd_decay_style: WSDDecayStyle = "exponential"  # Megatron's default; minus_sqrt = 1 - sqrt(progress)
    # [start, increment, samples]: the global batch grows from start by increment until
    # global_batch_size after `samples` samples (Megatron's --rampup-batch-size; llm.config.batches)
    rampup_batch_size: list[int] | None = None
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1.0e-8
    optimizer: Optimizer = "adamw"  # sgd: torch's SGD with train.sgd_momentum (e.g. DiLoCo's inner one)
    sgd_momentum: float = 0.0
    # muon: Muon for the hidden weight matrices, AdamW (lr, adam_*) for the rest (llm.training.muon)
    muon_lr: float | None = None  # None = train.lr (the "rms" scale makes Muon's updates AdamW-sized)
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_ns_steps: int = 5  # Newton-Schulz iterations
    muon_scale: MuonScale = "rms"  # rms: 0.2 sqrt(max(rows, cols)) (Moonlight); shape: sqrt(max(1, rows/cols))
    clip_grad: float = 1.0
    seed: int = 1234
    precision: Precision = "auto"  # auto = bf16 on CUDA, fp32 on CPU; fp8 = bf16 with FP8 linear layers
    exit_interval: int | None = None
    spike_detection: SpikeDetectionConfig = field(default_factory=SpikeDetectionConfig)
    max_rollbacks: int = 3  # reloads of the latest checkpoint after spikes before the run stops
    skip_batches_on_rollback: int = 0  # global batches skipped after the spiking one, besides those up to it
    # Global batches never to train, as "a-b" or "a": numbered as the iterations of an uninterrupted
    # run that train them (what a rollback skips automatically, given by hand: the data around a spike
    # seen in an earlier run). Steps go on with the next batch; the iteration count does not jump.
    skip_batches: list[str] = field(default_factory=list)

    @property
    def decay_iters(self) -> int:
        return self.lr_decay_iters or self.train_iters

    @property
    def wsd_decay_iters(self) -> int:
        """The iterations of WSD's decay phase, at the end of the decay length."""
        if self.lr_wsd_decay_iters is not None:
            return self.lr_wsd_decay_iters
        return max(1, round(self.lr_wsd_decay_fraction * self.decay_iters))

    @property
    def batch_schedule(self) -> BatchSchedule:
        """The global batch of every iteration (constant, or ramped up: train.rampup_batch_size)."""
        return _batch_schedule(
            self.global_batch_size, tuple(self.rampup_batch_size) if self.rampup_batch_size else None
        )

    @property
    def skip_ranges(self) -> list[tuple[int, int]]:
        """train.skip_batches as (first, last) batch numbers, 1-based and inclusive; ValueError names
        an entry that is not one (validation turns it into the setting's error)."""
        out = []
        for item in self.skip_batches:
            first, _, last = str(item).partition("-")
            if not (
                first.isdigit() and (last.isdigit() or not last) and 1 <= int(first) <= int(last or first)
            ):
                raise ValueError(item)
            out.append((int(first), int(last or first)))
        return out


@dataclass
class DataConfig:
    train_data_path: str | list[Any] | None = None
    valid_data_path: str | list[Any] | None = None
    test_data_path: str | list[Any] | None = None
    split: str = "969,30,1"
    tokenizer: str | None = None
    index_cache_dir: str | None = None  # None = <prefix dir>/index-cache
    num_workers: int = 0
    # Document-aware training (Megatron's names): attention stays inside each document of a sample,
    # positions restart at each document, the loss of the prediction made at an EOD is not counted.
    reset_attention_mask: bool = False
    reset_position_ids: bool = False
    eod_mask_loss: bool = False
    eod_token_id: int | None = None  # None = the tokenizer's EOS (what preprocessing appends)
    # resume on data other than the checkpoint's (other files, blend, split or seed): announced, not refused
    allow_changed_data: bool = False

    @property
    def document_aware(self) -> bool:
        return self.reset_attention_mask or self.reset_position_ids or self.eod_mask_loss


@dataclass
class DilocoConfig:
    """DiLoCo islands (Douillard et al. 2023) and Streaming DiLoCo (2025): `islands` groups of ranks
    train on their own for `inner_steps` steps, then average their outer gradient (start-of-round
    weights minus current weights) across islands and apply it with Nesterov momentum (README, "DiLoCo
    islands"). islands = 1: ordinary synchronous training (the default)."""

    islands: int = 1
    inner_steps: int = 500  # H: inner optimizer steps per round
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    nesterov: bool = True
    exchange: Exchange = "fp32"  # the outer gradient on the wire: fp32, bf16/fp16, int8 or int4 blockwise
    quant_block_size: int = 128  # elements per scale of int8/int4
    error_feedback: bool = True  # keep what quantization lost and add it to the next round's outer gradient
    fragments: int = 1  # Streaming DiLoCo: fragments synchronized at staggered steps (1 = all at once)
    delay: int = 0  # tau: inner steps the exchange overlaps before the outer update is applied
    mixing: float = 0.5  # with delay > 0: new weights = mixing x local + (1 - mixing) x outer result


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    pipeline_partition_method: PartitionMethod = "parameters"
    timeout_minutes: float = 30.0  # a collective waiting longer fails (a hung or stopped rank)
    # DeepSpeed's gradient reduction dtype (its `communication_data_type`); None = the training dtype
    communication_data_type: CommDtype | None = None
    # the experts of every MoE layer divided over this many data-parallel ranks (Megatron's name)
    expert_model_parallel_size: int = 1
    # the sequence split over this many ranks for attention (Megatron's --context-parallel-size):
    # cp_comm_type p2p = ring attention, a2a = DeepSpeed-Ulysses. The model takes it; training does not yet.
    context_parallel_size: int = 1
    cp_comm_type: CPCommType = "p2p"
    diloco: DilocoConfig = field(default_factory=DilocoConfig)


@dataclass
class EvalConfig:
    eval_interval: int = 1000
    eval_iters: int = 10
    # lm-evaluation-harness tasks during training (rank 0, TP 1, PP 1, ZeRO < 3; scripts/pretrain.py)
    lm_eval_tasks: list[str] = field(default_factory=list)
    lm_eval_interval: int | None = None  # None = eval.eval_interval
    lm_eval_limit: float | None = None  # examples per task (or a fraction)
    lm_eval_num_fewshot: int | None = None
    lm_eval_include_path: str | None = None  # a directory of task YAMLs


@dataclass
class LoggingConfig:
    log_interval: int = 10
    dir: str = "runs/default"
    wandb_project: str | None = None
    wandb_entity: str | None = None
    wandb_name: str | None = None
    wandb_mode: WandbMode = "auto"  # auto = online when logged in, else offline
    tensorboard_dir: str | None = None  # Megatron's --tensorboard-dir: event files of the same scalars
    # torch.profiler over the steps of iterations start..end (Megatron's --profile-step-start/-end) on
    # these ranks: a Chrome trace and a per-step table in <dir>/profile/ (llm/training/profile.py)
    profile_step_start: int | None = None
    profile_step_end: int | None = None
    profile_ranks: list[int] = field(default_factory=lambda: [0])


@dataclass
class CheckpointConfig:
    dir: str | None = None  # None = <logging.dir>/checkpoints
    save_interval: int | None = None
    resume: str = "auto"  # auto | none | a checkpoint directory
    keep_last: int | None = None
    verify: bool = True  # check every file's checksum before resuming
    break_lock: bool = False  # take over a run directory another host's run seems to hold
    # unpickle checkpoint files without restriction (they could run code): only for a checkpoint you trust
    trust_pickles: bool = False
    # save in the background: the step only copies the state to host memory; writing, hashing,
    # MANIFEST and `latest` follow in a thread (llm/checkpoint/background.py; Megatron's --async-save)
    async_save: bool = False
    # flush every file of a checkpoint to disk (fsync; each rank its share, while hashing it), then its
    # directories, MANIFEST and `latest`, in that order: a checkpoint that `latest` names survives a
    # power loss or kernel crash. Off: the page cache writes it out later (faster; a crash within
    # about 30 s of a save can damage it, and resume: auto then falls back to an earlier one).
    fsync: bool = True


@dataclass
class DebugConfig:
    """Fault injection for testing recovery; off by default."""

    # Iterations (numbered as in an uninterrupted run): the global batch each of them trains gets a
    # non-finite (nan) or huge (x1e8) loss, before backward. A batch skipped after a rollback is
    # never trained again, so each injection happens once.
    inject_loss_spike_at: list[int] = field(default_factory=list)
    inject_loss_value: Literal["nan", "huge"] = "nan"
    # A slow disk: the background checkpoint writer (checkpoint.async_save) waits this long before
    # writing, so that a test can kill a process while a write is in flight.
    checkpoint_write_delay_seconds: float = 0.0
    # The host copy of an asynchronous save waits this long before it copies, so that the next step's
    # forward and backward run first: a test that they change nothing saved and that the optimizer
    # step waits for the copy.
    checkpoint_copy_delay_seconds: float = 0.0
    # train.precision: fp8 on CPU, through torch's reference FP8 matmul: slow, and for tests of the FP8
    # path on a machine without an FP8 GPU only (a real run on CPU is refused).
    fp8_on_cpu: bool = False


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    deepspeed_config: str | None = None

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or str(Path(self.logging.dir) / "checkpoints")

    def data_parallel_size(self, world_size: int) -> int:
        """Data-parallel ranks of one island (of the world without DiLoCo islands); context-parallel
        ranks hold parts of the same samples and are not counted."""
        p = self.parallel
        return world_size // (
            p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size * p.diloco.islands
        )

    def grad_accumulation_steps(self, world_size: int) -> int:
        dp = self.data_parallel_size(world_size) * self.parallel.diloco.islands
        return self.train.global_batch_size // (self.train.micro_batch_size * dp)

    def deepspeed_batch_size(self, global_batch: int | None = None) -> int:
        """The batch DeepSpeed's engine is told of a global batch (default train.global_batch_size): one
        island's samples; under pipeline and context parallelism DeepSpeed's data axis holds DP x CP
        ranks (engine.pipeline_grid), each counted with its micro-batches: CP times that."""
        batch = (self.train.global_batch_size if global_batch is None else global_batch) // self.parallel.diloco.islands
        p = self.parallel
        return batch * p.context_parallel_size if p.pipeline_model_parallel_size > 1 else batch

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_precision(precision: str, *, cuda: bool) -> RunPrecision:
    """train.precision with `auto` settled (bf16 on a GPU, fp32 on CPU): the engine's precision. fp8 is
    bf16 to the engine (weights, gradients, everything but the FP8 matmuls of the linear layers)."""
    if precision == "fp8":
        return "bf16"
    if precision == "auto":
        return "bf16" if cuda else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"train.precision = {precision!r}")
    return cast(RunPrecision, precision)


@functools.lru_cache(maxsize=8)
def _batch_schedule(global_batch_size: int, rampup: tuple[int, ...] | None) -> BatchSchedule:
    return BatchSchedule(global_batch_size, rampup)  # type: ignore[arg-type]
