"""Gate training: distillation from the frozen model plus the capacity loss (TRIM-KV section 3.3).

Only the retention gates train. Each step runs the model twice on the same tokens: as the teacher
(gates bypassed, plain causal attention, no grad) and as the student (retention-gated attention,
``softmax(q.k * scale + (t - i) log beta_i)``). Loss = KL(teacher || student) + NTP on target tokens
(summed by default, as in the paper) + ``lambda_cap`` * capacity loss with memory ``M``.

Built on ``accelerate`` (bf16 autocast on CPU or GPU, one or several processes). Gradients of the
tiny gate set are averaged across processes by hand, which keeps one code path for 1..N
processes. Checkpoints are written atomically every ``save_every`` steps; ``resume=True``
continues exactly where the last complete checkpoint left off (data example ``i`` is a pure
function of ``(seed, i)``).

Several processes (``torchrun --nproc_per_node N -m kvbound train ...`` or ``accelerate launch
-m kvbound train ...``; gloo on CPU, NCCL on GPU, see docs/distributed.md): each process holds the
whole frozen model and the same gates (seeded, then broadcast from rank 0), takes a disjoint
slice of every global batch, and the gate gradients are averaged with one ``all_reduce`` per
step, so N processes x ``batch_size`` B train like one process with ``grad_accum`` N x B (up to
float summation order). Logged metrics are averaged over processes (``tokens`` summed). Only
rank 0 writes the log, checkpoints and the final gates; the others wait at barriers.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from kvbound.errors import ConfigError, KVBoundError
from kvbound.gates import GateMetadata, RetentionGates
from kvbound.hooks import attach, detach
from kvbound.io import atomic_write_json, read_versioned, write_versioned
from kvbound.progress import progress_bar
from kvbound.train.data import Mixture
from kvbound.train.gating import log_beta_of

CKPT_DIR = "checkpoint"
#: what runs did before a setting existed, where that differs from the setting's default
BEHAVIOUR_BEFORE_FIELD = {"evict_scale": "absolute", "evict_budgets": []}
TRAINER_FILE = "trainer.pt"
LOG_FILE = "train_log.jsonl"


@dataclass
class TrainConfig:
    """Everything that defines a gate-training run (saved next to the gates)."""

    model: str | None = None
    out: str = "runs/gates"
    memory_size: int = 64
    seq_len: int = 1024
    steps: int = 500
    data: str = "prose"
    seed: int = 0
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    intermediate_size: int = 128
    bias_init: float = 8.0
    gate_positions: bool = False
    #: gates also output a log initial importance per token (:class:`RetentionGate` log_alpha),
    #: trained by the attention-rank objective
    gate_log_alpha: bool = False
    #: learning-rate multiplier of the gates' position input (``gate_positions``): zero-initialised
    #: and read through the hidden layer, at the base rate it moves a first token's logit by
    #: ~lr x I per step, far too slow to learn "keep the attention sink" (beta ~ 1 - 1e-6,
    #: logit ~ 14 from an init of 8) within a few hundred steps
    position_lr_scale: float = 1.0
    #: train only the position input, every other gate weight frozen at ``init_gates``: teaches
    #: trained gates to keep the first tokens (the attention sinks) without touching the ranking
    #: they learned for the rest
    train_position_only: bool = False
    #: the opposite: keep the position input of ``init_gates`` as it is and train the rest (the
    #: learned sinks stay while the ranking of the other tokens is retrained)
    freeze_positions: bool = False
    init_gates: str | None = None
    lambda_cap: float = 1.0
    cap_variant: str = "paper"
    quality_reduction: str = "sum"
    train_sinks: int = 4
    evict_aware: bool = False
    evict_tau: float = 0.05
    evict_scale: str = "relative"
    #: budgets the student's eviction (or attention-rank's top-M cut) and the capacity loss cycle
    #: through, one per step (empty: ``memory_size`` every step); a ranking trained at several M
    #: serves every budget
    evict_budgets: list[int] = field(default_factory=list)
    #: keep the paper's soft decay in the student beside the eviction mask (False: mask alone,
    #: as the cache attends)
    evict_decay: bool = True
    #: "distill": the paper's distillation (teacher and student passes); "attention-rank": the
    #: gate's eviction ranking fitted to the frozen model's future attention
    #: (:mod:`kvbound.train.rank_loss`; one forward pass a step, no student)
    objective: str = "distill"
    #: attention-rank: queries summed into a key's future attention, and decision times' spacing
    rank_horizon: int = 256
    rank_stride: int = 16
    #: attention-rank: the future attention is summed over every N-th query (x N), 1/N the cost
    rank_query_step: int = 4
    #: attention-rank: one list per KV head ("head"), per layer, the heads side by side
    #: ("layer": calibrates heads against each other, for budget_scope="layer" caches) or per
    #: model, every layer's heads ("model": for budget_scope="global")
    rank_scope: str = "head"
    #: attention-rank: weight of the top-M term (:func:`kvbound.train.rank_loss.topm_lost_mass`,
    #: the future attention a cut at the step's budget M per KV head loses) beside ListNet;
    #: 0 = ListNet alone. The cut is M per head list, M x heads per layer list and
    #: M x heads x layers per model list (rank_scope)
    rank_topm_weight: float = 0.0
    #: its temperature, in score units (log importance)
    rank_topm_tau: float = 1.0
    #: the top-M term over the keys that survived the earlier cuts only (a cache's evictions
    #: are final; :func:`kvbound.train.rank_loss.survivors`)
    rank_topm_sequential: bool = False
    #: the top-M temperature as a fraction of each list's score spread instead of score units
    rank_topm_relative: bool = False
    #: weight of the listwise (ListNet) loss itself (1: the objective; lower it to let the
    #: top-M term lead)
    rank_listnet_weight: float = 1.0
    bf16: bool = True
    grad_checkpointing: bool = False
    save_every: int = 50
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        """Raise :class:`kvbound.errors.ConfigError` (naming the field) for a bad setting."""
        for name in ("memory_size", "seq_len", "steps", "batch_size", "grad_accum", "save_every",
                     "intermediate_size", "rank_horizon", "rank_stride", "rank_query_step"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(name, f"{name} must be a positive integer, got {value!r}.")
        if not self.lr > 0:
            raise ConfigError("lr", f"lr must be > 0, got {self.lr!r}.")
        from kvbound.train.rank_loss import SCOPES

        if not self.rank_topm_weight >= 0 or not self.rank_topm_tau > 0:
            raise ConfigError("rank_topm_weight", "rank_topm_weight must be >= 0 and "
                              "rank_topm_tau > 0.")
        if not self.rank_listnet_weight >= 0:
            raise ConfigError("rank_listnet_weight", "rank_listnet_weight must be >= 0.")
        if self.rank_topm_sequential and not self.rank_topm_weight:
            raise ConfigError("rank_topm_sequential", "rank_topm_sequential needs "
                              "rank_topm_weight > 0 (it changes that term).")
        if self.rank_scope not in SCOPES:
            raise ConfigError("rank_scope", f"rank_scope must be one of {', '.join(SCOPES)}, "
                                            f"got {self.rank_scope!r}.")
        if not self.position_lr_scale > 0:
            raise ConfigError("position_lr_scale", f"position_lr_scale must be > 0, got "
                                                   f"{self.position_lr_scale!r}.")
        if self.position_lr_scale != 1.0 and not self.gate_positions:
            raise ConfigError("position_lr_scale", "position_lr_scale needs gate_positions "
                                                   "(there is no position input to scale).")
        if self.train_position_only and not (self.gate_positions and self.init_gates):
            raise ConfigError("train_position_only", "train_position_only needs gate_positions "
                              "and init_gates (it trains the position input of gates trained "
                              "before).")
        if self.freeze_positions and not (self.gate_positions and self.init_gates):
            raise ConfigError("freeze_positions", "freeze_positions needs gate_positions and "
                              "init_gates (it keeps the position input of gates trained before).")
        if self.freeze_positions and self.train_position_only:
            raise ConfigError("freeze_positions", "freeze_positions and train_position_only "
                              "exclude each other (nothing would train).")
        if self.objective not in ("distill", "attention-rank"):
            raise ConfigError("objective", f"objective must be 'distill' or 'attention-rank', "
                                           f"got {self.objective!r}.")
        if self.objective == "attention-rank" and self.seq_len <= 16:
            raise ConfigError("seq_len", f"seq_len must be > 16 for the attention-rank objective "
                              f"(its first decision time is token 16), got {self.seq_len}.")
        if self.gate_log_alpha and self.objective != "attention-rank":
            raise ConfigError("gate_log_alpha", "gate_log_alpha needs objective "
                              "'attention-rank' (the distillation objective has no place for an "
                              "initial importance).")
        if self.objective == "attention-rank" and self.evict_aware:
            raise ConfigError("evict_aware", "evict_aware shapes the student's attention, which "
                              "attention-rank training does not run; drop one of them.")
        if self.cap_variant not in ("paper", "official"):
            raise ConfigError("cap_variant", "cap_variant must be 'paper' or 'official'.")
        if self.quality_reduction not in ("sum", "mean"):
            raise ConfigError("quality_reduction", "quality_reduction must be 'sum' or 'mean'.")
        if self.train_sinks < 0:
            raise ConfigError("train_sinks", "train_sinks must be >= 0.")
        if not self.evict_tau > 0:
            raise ConfigError("evict_tau", f"evict_tau must be > 0, got {self.evict_tau!r}.")
        if self.evict_scale not in ("relative", "absolute"):
            raise ConfigError("evict_scale", "evict_scale must be 'relative' or 'absolute'.")
        budgets = self.evict_budgets
        if not isinstance(budgets, (list, tuple)) or not all(
                isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in budgets):
            raise ConfigError("evict_budgets", f"evict_budgets must be a list of positive "
                                               f"integers, got {budgets!r}.")
        if not self.evict_decay and not self.evict_aware:
            raise ConfigError("evict_decay", "evict_decay=False needs evict_aware (without the "
                              "eviction mask the student would be plain attention).")
        if budgets and not (self.evict_aware or self.rank_topm_weight):
            raise ConfigError("evict_budgets", "evict_budgets needs evict_aware or "
                              "rank_topm_weight (the budgets are those the student's eviction "
                              "or the attention-rank top-M cut cycles through).")

    def budget_at(self, step: int) -> int:
        """The budget M of optimizer step ``step``: ``evict_budgets`` in turn, else memory_size."""
        return self.evict_budgets[step % len(self.evict_budgets)] if self.evict_budgets \
            else self.memory_size


def parameter_groups(gates: nn.Module, cfg: TrainConfig) -> list[dict]:
    """AdamW groups: the position inputs at ``lr * position_lr_scale``, the rest at ``lr`` (one
    group when the scale is 1, as runs from before the setting have it)."""
    trainable = [(n, p) for n, p in gates.named_parameters() if p.requires_grad]
    if cfg.position_lr_scale == 1.0:
        return [{"params": [p for _, p in trainable], "lr": cfg.lr}]
    position = [p for n, p in trainable if _is_position(n)]
    rest = [p for n, p in trainable if not _is_position(n)]
    groups = [{"params": rest, "lr": cfg.lr}] if rest else []
    if position:
        groups.append({"params": position, "lr": cfg.lr * cfg.position_lr_scale})
    return groups


def _is_position(name: str) -> bool:
    return ".position." in f".{name}"


def lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine

    return f


def _bf16_ok(device: torch.device) -> bool:
    """bf16 autocast only where the hardware computes bf16 natively: on a CPU without AVX512-BF16
    or AMX (e.g. AVX2-only machines) bf16 matmuls are emulated and ~20x slower than fp32."""
    from kvbound.models.dtype import native_bf16

    return native_bf16(device)


def warm_start(gates: RetentionGates, source: str, model) -> dict:
    """Copy the weights of trained gates ``source`` into the fresh ``gates`` (fine-tuning).

    Both sets must gate the same layers. A position input or log-alpha output that ``gates`` has
    and ``source`` lacks keeps its zero init; a wider ``gates`` (larger intermediate size) is widened function-
    preservingly (Net2Net, Chen et al. 2016): the source's hidden units are copied into the first
    ones, the extra units keep their random input weights and get zero output weights. Either way
    step 0 computes exactly what the source does. Returns the provenance recorded in the new
    gates' metadata."""
    src = RetentionGates.load(source, model)
    mine, theirs = gates.config, src.config
    if mine.gated_layers != theirs.gated_layers or mine.intermediate_size < theirs.intermediate_size:
        raise KVBoundError(
            f"--init-gates {source}: those gates have width {theirs.intermediate_size} on layers "
            f"{theirs.gated_layers}, this run {mine.intermediate_size} on {mine.gated_layers}. "
            f"Pass --intermediate-size {theirs.intermediate_size} (or wider) to fine-tune them.")
    if theirs.position_input and not mine.position_input:
        raise KVBoundError(f"--init-gates {source}: those gates read token positions; add "
                           "--gate-positions to fine-tune them.")
    if theirs.log_alpha and not mine.log_alpha:
        raise KVBoundError(f"--init-gates {source}: those gates give an initial importance; add "
                           "--gate-log-alpha to fine-tune them.")
    own = gates.state_dict()
    unexpected = [k for k in src.state_dict() if k not in own]
    if unexpected:
        raise KVBoundError(f"--init-gates {source}: weights do not match this gate layout "
                           f"(unexpected {unexpected}).")
    width = theirs.intermediate_size
    with torch.no_grad():
        for name, value in src.state_dict().items():
            target = own[name]
            if name.endswith(("linear2.weight", "alpha.weight")):  # (H_kv, I): extra units add 0
                target.zero_()
                target[:, :width] = value
            elif name.endswith(("linear1.weight", "linear1.bias", "position.weight")):
                target[:width] = value  # (I, ...): extra units keep their init
            else:
                target.copy_(value)
    return {"source": str(source), "ref": src.ref(),
            "steps": src.metadata.training.get("steps_done"),
            "command": src.metadata.training.get("command"),
            **({"widened_from": width} if mine.intermediate_size > width else {})}


def gate_summary(gates: RetentionGates, log_betas: list[torch.Tensor]) -> dict:
    """Median token half-life (tokens) over the batch, all gated layers."""
    lb = torch.cat([x.detach().flatten() for x in log_betas]).float()
    half = math.log(0.5) / lb.clamp(max=-1e-12)
    return {"half_life_median": float(half.median()), "log_beta_mean": float(lb.mean())}


class Trainer:
    """Runs :class:`TrainConfig`; ``run()`` returns the trained :class:`RetentionGates`."""

    def __init__(self, cfg: TrainConfig, model=None, tokenizer=None, *, progress: bool = True,
                 command: str | None = None):
        from accelerate import Accelerator

        cfg.validate()
        self.cfg, self.progress, self.command = cfg, progress, command
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        if model is None:
            from kvbound.models import load_model

            model, tokenizer = load_model(cfg.model)
        self.model, self.tokenizer = model, tokenizer
        self.out = Path(cfg.out)
        self.device = self.accelerator.device
        self.use_bf16 = cfg.bf16 and _bf16_ok(self.device)

    # --------------------------------------------------------------------------- setup
    def _setup(self):
        cfg, model = self.cfg, self.model
        torch.manual_seed(cfg.seed)
        model.to(self.device)
        model.requires_grad_(False)
        model.eval()
        self.gates = RetentionGates.for_model(
            model, intermediate_size=cfg.intermediate_size, bias_init=cfg.bias_init, seed=cfg.seed,
            position_input=cfg.gate_positions, log_alpha=cfg.gate_log_alpha,
        )
        self.init_source = None
        if cfg.init_gates:
            self.init_source = warm_start(self.gates, cfg.init_gates, model)
        self.gates.to(self.device)
        self.gates.train()
        if cfg.train_position_only:
            for name, p in self.gates.named_parameters():
                p.requires_grad_(_is_position(name))
        if cfg.freeze_positions:
            for name, p in self.gates.named_parameters():
                p.requires_grad_(not _is_position(name))
        self.optimizer = torch.optim.AdamW(parameter_groups(self.gates, cfg), lr=cfg.lr,
                                           weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        # rank 0 first: a selfgen source generates and caches its texts once, the others read them
        with self.accelerator.main_process_first():
            self.data = Mixture(cfg.data, self.tokenizer, cfg.seq_len, cfg.seed, model=model,
                                cache_dir=self.out)
        self.start_step = 0
        self.log: list[dict] = []
        if cfg.extra.get("resume"):
            self._load_checkpoint()  # every rank reads the same checkpoint
        self._broadcast_gates()
        if self.accelerator.is_main_process:  # the log mirrors exactly the steps behind the gates
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / LOG_FILE).write_text("".join(json.dumps(r) + "\n" for r in self.log))
        self.accelerator.wait_for_everyone()  # nobody starts before every rank has loaded

    def _attach(self):
        from kvbound.train.attention import register_retention_attention

        model = self.model
        detach(model)
        state = attach(model, gates=self.gates)
        state.train_sinks = self.cfg.train_sinks
        if self.cfg.evict_aware:  # the student sees the cache's top-M eviction (attention.py)
            state.train_evict = {"evict_budget": self.cfg.memory_size,
                                 "evict_tau": self.cfg.evict_tau,
                                 "evict_scale": self.cfg.evict_scale,
                                 "evict_decay": self.cfg.evict_decay}
        if self.cfg.objective == "attention-rank":
            state.train_rank = {"horizon": self.cfg.rank_horizon, "stride": self.cfg.rank_stride,
                                "query_step": self.cfg.rank_query_step,
                                "scope": self.cfg.rank_scope, "lists": True}
        name = register_retention_attention()
        # transformers documents no public getter (5.24); set_attn_implementation is the setter
        self._prev_impl = model.config._attn_implementation
        model.set_attn_implementation(name)
        if self.cfg.grad_checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
        self.gated = [m for i, m in enumerate(self._attn_modules()) if i in self.gates]
        return state

    def _attn_modules(self):
        from kvbound.architectures import attention_modules

        return attention_modules(self.model)

    def _restore(self):
        model = self.model
        if self.cfg.grad_checkpointing:
            model.activation_checkpointing_disable()
        model.set_attn_implementation(self._prev_impl)
        detach(model)

    # --------------------------------------------------------------------------- checkpoints
    def _save_checkpoint(self, step: int) -> None:
        if not self.accelerator.is_main_process:
            return
        self.gates.metadata = self._metadata(step)
        gates_state = {k: v.detach().cpu().clone() for k, v in self.gates.state_dict().items()}
        trainer_state = {
            "step": step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "config": asdict(self.cfg),
            "processes": self.accelerator.num_processes,
        }

        def write(tmp: Path) -> None:
            snapshot = RetentionGates(self.gates.config, self.gates.metadata)
            snapshot.load_state_dict(gates_state)
            snapshot.save(tmp)
            torch.save(trainer_state, tmp / TRAINER_FILE)
            # the log of the steps this checkpoint holds, in the same atomic directory: a kill
            # between two separate writes would otherwise resume with a log a step short
            (tmp / "train_log.json").write_text(json.dumps(self.log))

        write_versioned(self.out, CKPT_DIR, write)
        atomic_write_json(self.out / "train_log.json", self.log)

    def _load_checkpoint(self) -> None:
        ckpt = read_versioned(self.out, CKPT_DIR)
        if ckpt is None or not (ckpt / TRAINER_FILE).exists():
            raise KVBoundError(f"--resume: no checkpoint in {self.out} (nothing to resume). Run "
                               "without --resume to start training there, or give the --out "
                               "directory of the run to continue.")
        loaded = RetentionGates.load(ckpt, self.model)
        self.gates.load_state_dict(loaded.state_dict())
        try:
            state = torch.load(ckpt / TRAINER_FILE, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise KVBoundError(f"Cannot read {ckpt / TRAINER_FILE}: {exc}. Delete the checkpoint "
                              "directory to start over.") from exc
        # settings added after the checkpoint was written take their defaults
        defaults = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
        defaults.update(BEHAVIOUR_BEFORE_FIELD)
        saved = {k: v for k, v in {**defaults, **state["config"]}.items()
                 if k not in ("steps", "out", "extra")}
        mine = {k: v for k, v in asdict(self.cfg).items() if k not in ("steps", "out", "extra")}
        if saved != mine:
            diff = {k: (saved.get(k), mine.get(k)) for k in mine if saved.get(k) != mine.get(k)}
            raise KVBoundError(f"--resume with a different configuration: {diff}. Use the same "
                              "settings (only --steps may change) or a new --out directory.")
        # the data of step s depends on the global batch, batch_size * grad_accum * processes
        saved_procs, procs = state.get("processes", 1), self.accelerator.num_processes
        if saved_procs != procs:
            raise KVBoundError(f"--resume with {procs} process(es), but the checkpoint was trained "
                              f"with {saved_procs}: the global batch would change. Resume with "
                              f"{saved_procs} process(es) or use a new --out directory.")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.start_step = int(state["step"])
        log_path = ckpt / "train_log.json"
        if not log_path.exists():  # checkpoints written before the log moved inside
            log_path = self.out / "train_log.json"
        if log_path.exists():
            self.log = [r for r in json.loads(log_path.read_text()) if r["step"] < self.start_step]

    def _metadata(self, step: int) -> GateMetadata:
        cfg = self.cfg
        last = self.log[-1] if self.log else {}
        return GateMetadata(
            training={
                "steps_done": step,
                "config": asdict(cfg),
                "command": self.command,
                "wall_seconds": round(sum(r["seconds"] for r in self.log), 1),
                "tokens": sum(r["tokens"] for r in self.log),
                "final": {k: last[k] for k in ("loss", "kl", "ntp", "rank", "cap") if k in last},
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "bf16_autocast": self.use_bf16,
                **({"init_gates": self.init_source} if self.init_source else {}),
            },
            recommended={"memory_size": cfg.memory_size, "sinks": cfg.train_sinks},
        )

    # --------------------------------------------------------------------------- loop
    def _micro_step(self, indices: list[int], state, budget: int) -> dict:
        from kvbound.train.losses import distillation_loss

        cfg = self.cfg
        if state.train_evict is not None:
            state.train_evict["evict_budget"] = budget
        batch = {k: v.to(self.device) for k, v in self.data.batch(indices).items()}
        ids, att, tgt = batch["input_ids"], batch["attention_mask"], batch["target_mask"]
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16)
        if cfg.objective == "attention-rank":
            return self._rank_step(ids, att, budget, autocast, state)
        with autocast:
            state.mode = "teacher"
            with torch.no_grad():
                teacher = self.model(input_ids=ids, attention_mask=att).logits
            state.mode = "student"
            student = self.model(input_ids=ids, attention_mask=att).logits
        log_betas = [log_beta_of(m) for m in self.gated]
        labels = torch.roll(ids, -1, dims=1)
        quality = distillation_loss(student, teacher, tgt, labels,
                                    reduction_mode=cfg.quality_reduction)
        cap = self._capacity_loss(log_betas, att, budget)
        loss = quality["total"] + cfg.lambda_cap * cap
        (loss / cfg.grad_accum).backward()
        return {
            "loss": float(loss.detach()),
            "kl": float(quality["kl"]),
            "ntp": float(quality["ntp"]),
            "cap": float(cap.detach()),
            "tokens": int(att.sum()),
            **gate_summary(self.gates, log_betas),
        }

    def _capacity_loss(self, log_betas: list[torch.Tensor], att: torch.Tensor,
                       budget: int) -> torch.Tensor:
        """The capacity loss at memory ``budget``, averaged over the gated layers."""
        from kvbound.train.losses import capacity_loss

        valid = att.bool()
        return torch.stack([capacity_loss(lb, budget, variant=self.cfg.cap_variant,
                                          valid_mask=valid) for lb in log_betas]).mean()

    def _rank_step(self, ids, att, budget: int, autocast, state) -> dict:
        """One micro-step of the attention-rank objective: the frozen model runs once (its
        decoder only: the output head is not needed), each gated layer scores its gate's ranking
        against its own attention (:mod:`kvbound.train.rank_loss`)."""
        from kvbound.train.gating import rank_loss_of, rank_of

        with autocast:
            state.mode = "rank"
            self.model.base_model(input_ids=ids, attention_mask=att)
        log_betas = [rank_of(m)[0] for m in self.gated]
        parts = [rank_loss_of(m) for m in self.gated]
        rank, kl, extra = self._rank_terms(parts, budget)
        cap = self._capacity_loss(log_betas, att, budget)
        loss = rank + self.cfg.lambda_cap * cap
        (loss / self.cfg.grad_accum).backward()
        return {"loss": float(loss.detach()), "kl": kl,
                "rank": float(rank.detach()), "cap": float(cap.detach()),
                "tokens": int(att.sum()), **extra, **gate_summary(self.gates, log_betas)}

    def _rank_terms(self, parts: list, budget: int) -> tuple[torch.Tensor, float, dict]:
        """ListNet (weighted) plus the top-M term over the step's lists: one per KV head
        (``rank_scope="head"``, cut at M), per layer (at M x heads) or per model (every gated
        layer's lists joined, at M x heads x layers). Returns the loss, the listwise KL and the
        top-M shares for the log."""
        from kvbound.train.rank_loss import join_lists, listnet, topm_lost_mass

        cfg = self.cfg
        groups = [join_lists(parts)] if cfg.rank_scope == "model" else parts
        fits = [listnet(g) for g in groups]
        rank = cfg.rank_listnet_weight * torch.stack([f[0] for f in fits]).mean()
        kl = sum(f[1] for f in fits) / len(fits)
        if not cfg.rank_topm_weight:
            return rank, kl, {}
        heads = {"head": 1, "layer": self.gates.config.num_kv_heads,
                 "model": self.gates.config.num_kv_heads * len(self.gated)}[cfg.rank_scope]
        cuts = [topm_lost_mass(g, budget * heads, cfg.rank_topm_tau,
                               sequential=cfg.rank_topm_sequential,
                               relative=cfg.rank_topm_relative) for g in groups]
        lost = torch.stack([c[0] for c in cuts]).mean()
        return rank + cfg.rank_topm_weight * lost, kl, {
            "topm_lost": float(lost.detach()), "topm_lost_hard": sum(c[1] for c in cuts) / len(cuts)}

    def _broadcast_gates(self) -> None:
        """Make rank 0's gate weights everyone's (they are seeded alike; this guarantees it)."""
        if self.accelerator.num_processes == 1:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for t in self.gates.state_dict().values():
                dist.broadcast(t, src=0)

    def _sync_grads(self) -> None:
        """Average the gate gradients over processes: one flat ``all_reduce`` per dtype."""
        if self.accelerator.num_processes == 1:
            return
        import torch.distributed as dist

        params = list(self.gates.parameters())
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for dtype in dict.fromkeys(p.grad.dtype for p in params):  # same order on every rank
            grads = [p.grad for p in params if p.grad.dtype == dtype]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat /= self.accelerator.num_processes
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()

    def _reduce_record(self, parts: list[dict]) -> dict:
        """Per-step metrics: mean over micro-steps and processes; ``tokens`` summed."""
        rec = {k: sum(p[k] for p in parts) / len(parts) for k in parts[0]}
        rec["tokens"] = sum(p["tokens"] for p in parts)
        world = self.accelerator.num_processes
        if world > 1:
            import torch.distributed as dist

            keys = list(rec)
            vals = torch.tensor([float(rec[k]) for k in keys], dtype=torch.float64,
                                device=self.device)
            dist.all_reduce(vals, op=dist.ReduceOp.SUM)
            rec = {k: float(v) / (1 if k == "tokens" else world) for k, v in zip(keys, vals)}
            rec["tokens"] = int(round(rec["tokens"]))
        return rec

    def run(self, stop_after: int | None = None) -> RetentionGates:
        """Train to ``cfg.steps`` (or stop after ``stop_after`` steps, for tests)."""
        cfg = self.cfg
        self._setup()
        state = self._attach()
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        per_step = cfg.batch_size * cfg.grad_accum * world
        progress = progress_bar(self.progress and self.accelerator.is_main_process, info=True)
        try:
            with progress:
                task = progress.add_task("training gates", total=cfg.steps,
                                         completed=self.start_step, info="")
                for step in range(self.start_step, cfg.steps):
                    if stop_after is not None and step >= self.start_step + stop_after:
                        break
                    t0 = time.perf_counter()
                    self.optimizer.zero_grad(set_to_none=True)
                    parts = []
                    for micro in range(cfg.grad_accum):
                        base = step * per_step + micro * cfg.batch_size * world
                        idx = [base + rank * cfg.batch_size + j for j in range(cfg.batch_size)]
                        parts.append(self._micro_step(idx, state, cfg.budget_at(step)))
                    self._sync_grads()
                    grad_norm = torch.nn.utils.clip_grad_norm_(self.gates.parameters(),
                                                               cfg.max_grad_norm)
                    self.optimizer.step()
                    self.scheduler.step()
                    rec = self._reduce_record(parts)
                    seconds = time.perf_counter() - t0
                    rec.update(step=step, seconds=seconds, lr=self.scheduler.get_last_lr()[0],
                               grad_norm=float(grad_norm), budget=cfg.budget_at(step))
                    self.log.append(rec)
                    if self.accelerator.is_main_process:
                        _append_jsonl(self.out / LOG_FILE, rec)
                    progress.update(task, advance=1, info=(
                        f"loss {rec['loss']:.3f} kl {rec['kl']:.3f} "
                        + (f"ntp {rec['ntp']:.3f} " if "ntp" in rec else "") +
                        f"cap {rec['cap']:.3f} t½ {rec['half_life_median']:.0f} "
                        f"{rec['tokens'] / seconds:.0f} tok/s"))
                    if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
                        self._save_checkpoint(step + 1)
        finally:
            state.mode = "inference"
            self._restore()
        done = self.log[-1]["step"] + 1 if self.log else self.start_step
        self.gates.metadata = self._metadata(done)
        self.gates.eval()
        if self.accelerator.is_main_process and done == cfg.steps:
            self.gates.save(self.out)
        self.accelerator.wait_for_everyone()  # on every rank, return once the gates are on disk
        return self.gates


def _append_jsonl(path: Path, rec: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(json.dumps(rec) + "\n")


def train(cfg: TrainConfig, model=None, tokenizer=None, **kwargs) -> RetentionGates:
    """Train retention gates as configured; writes checkpoints and the final gates to cfg.out."""
    return Trainer(cfg, model, tokenizer, **kwargs).run()

