"""Every core config in one light module (dataclasses only, no torch): what a stage can set, with its
default, one comment a field. Defaults are what a TRL user expects for a real model; the sandbox
quickstart writes its own tuned values in pipelines.yaml. The trainers take these as explicit arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by the SFT, reward-model, DPO and PPO trainers."""

    max_steps: int  # number of optimizer steps (PPO: per whole run, over all iterations)
    batch_size: int = 8  # examples per optimizer step (split into grad_accum_steps micro-batches)
    grad_accum_steps: int = 1  # micro-batches accumulated before each optimizer step (the same gradient as the whole batch)
    lr: float = 1e-4  # peak learning rate of AdamW
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 0  # linear warm-up from 0 to lr over this many steps
    lr_schedule: str = "cosine"  # after warm-up: "constant", "linear" or "cosine" decay to 0
    max_grad_norm: float = 1.0  # gradient clipping by global norm; 0 = off
    seed: int = 0  # seed of the data order, initialisation noise and sampling
    checkpoint_every: int = 0  # save a resumable checkpoint every N optimizer steps; 0 = never
    mixed_precision: str = "no"  # "no", "bf16" or "fp16" (autocast; used on GPU)
    group_by_length: bool = True  # batches of similar length (less padding): see StepSampler
    compile: bool = False  # torch.compile the trained module (dynamic shapes); pays off on long GPU runs
    gradient_checkpointing: bool = False  # recompute activations in the backward pass (less memory, ~30% slower)


CACHES = ("auto", "dynamic", "static")  # SamplingParams.cache
DTYPES = ("auto", "float32", "bfloat16", "float16")  # a stage's `dtype`: how its models' weights load


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256  # answer length limit, in tokens
    temperature: float = 1.0  # tau: logits / tau before softmax; 0 = greedy
    top_p: float = 1.0  # nucleus sampling: keep the smallest set of tokens with probability >= top_p
    top_k: int = 0  # keep the k most likely tokens; 0 = all
    stop_token_ids: tuple[int, ...] = ()  # generation of a row ends after one of these (it is kept)
    batch_size: int = 256  # prompts sampled together (PPO rollouts: rollout_batch_size instead)
    cache: str = "auto"  # KV cache: "auto" = static with a compiled decoding step on CUDA, dynamic elsewhere;
    # "dynamic" grows a token at a time; "static" is allocated once for prompt + max_new_tokens (prompts padded to
    # a multiple of 64 tokens), so every decoding step has the same shapes (what a compiled step needs)
    compile: bool = False  # torch.compile the decoding step (static cache; CUDA graphs on a GPU) on any device.
    # The first call compiles (a minute or more): for long rollouts on a GPU, not for short CPU runs

    def __post_init__(self):
        if self.cache not in CACHES:
            raise ValueError(f"cache must be one of {', '.join(CACHES)}, not {self.cache!r}")


@dataclass(frozen=True)
class LoRAConfig:
    r: int = 16  # rank of each adapter
    alpha: int = 32  # scaling lora_alpha; the update is (alpha / r) * B A
    dropout: float = 0.0  # dropout on the adapter input
    target_modules: str | tuple[str, ...] = "all-linear"  # module names, or every linear layer but the head


@dataclass(frozen=True)
class SFTConfig:
    """Defaults as TRL's SFTConfig (lr 2e-5, max_length 1024)."""

    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=1000, batch_size=8, lr=2e-5))  # optimisation
    max_length: int = 1024  # prompt + answer tokens per example (longer ones are truncated)
    packing: bool = False  # a micro-batch's rows hold several examples, each seeing only itself, up to its longest
    # one's length: the same loss with less padding (alignment.prefix.pack_rows)
    micro_batch_tokens: int = 0  # a token budget (needs packing): each step's examples are packed into micro-batches
    # of one row of exactly this many tokens (in place of grad_accum_steps): memory bounded by the budget, not by
    # batch_size x the longest example, and every micro-batch the same shape (what train.compile wants). 0 = off

    def __post_init__(self):
        _check_packing(self)


@dataclass(frozen=True)
class RewardConfig:
    """Defaults as TRL's RewardConfig (lr 1e-4, max_length 1024); train.batch_size counts pairs."""

    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=1000, batch_size=8, lr=1e-4))  # optimisation
    margin: float = 0.0  # m in -log sigma(r_w - r_l - m)
    center_coef: float = 0.0  # eta of the centering term eta * E[(r_w + r_l)^2]
    max_length: int = 1024  # prompt + answer tokens per sequence
    shared_prefix: bool = True  # one row prompt ++ chosen ++ rejected per pair (prompt computed once)
    group_by_prompt: bool = False  # a batch element is a prompt with all its answers, each scored once, and
    # every labeled pair among them (InstructGPT's K-way batches); train.batch_size then counts prompts
    packing: bool = False  # a micro-batch's rows hold several pairs (or prompt groups), each seeing only itself,
    # up to its longest one's length: the same losses with less padding (alignment.prefix.pack_rows; shared_prefix)
    micro_batch_tokens: int = 0  # a token budget (needs packing): each step's pairs (prompt groups) are packed into
    # micro-batches of one row of exactly this many tokens (in place of grad_accum_steps): memory bounded by the
    # budget, every micro-batch the same shape (what train.compile wants). 0 = off

    def __post_init__(self):
        _check_packing(self)


@dataclass(frozen=True)
class DPOConfig:
    """Defaults as TRL's DPOConfig (beta 0.1, lr 1e-6, max_length 1024); train.batch_size counts pairs."""

    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=1000, batch_size=8, lr=1e-6))  # optimisation
    beta: float = 0.1  # strength of the implicit KL constraint to the reference
    loss_type: str = "sigmoid"  # "sigmoid" (DPO) or "ipo"
    label_smoothing: float = 0.0  # eps of conservative DPO: assumed probability that a label is flipped
    max_length: int = 1024  # prompt + answer tokens per sequence
    precompute_ref_logps: bool = True  # reference log-probs computed once up front, not every step
    shared_prefix: bool = True  # chosen and rejected read one copy of their prompt (alignment.prefix)
    group_by_prompt: bool = False  # a batch element is a prompt with all its answers, each scored once, and
    # every labeled pair among them; train.batch_size then counts prompts (alignment.prefix.group_by_prompt)
    packing: bool = False  # a micro-batch's rows hold several pairs (or prompt groups), each seeing only itself,
    # up to its longest one's length: the same losses with less padding (alignment.prefix.pack_rows; shared_prefix)
    micro_batch_tokens: int = 0  # a token budget (needs packing): each step's pairs (prompt groups) are packed into
    # micro-batches of one row of exactly this many tokens (in place of grad_accum_steps): memory bounded by the
    # budget, every micro-batch the same shape (what train.compile wants). 0 = off

    def __post_init__(self):
        _check_packing(self)


def _check_packing(cfg) -> None:
    if cfg.packing and not (getattr(cfg, "shared_prefix", True) or cfg.group_by_prompt):
        raise ValueError("packing puts several shared-prefix rows into one: it needs shared_prefix: true (or group_by_prompt)")
    if cfg.micro_batch_tokens < 0:
        raise ValueError(f"micro_batch_tokens must be 0 (off) or a number of tokens, not {cfg.micro_batch_tokens}")
    if cfg.micro_batch_tokens and not cfg.packing:
        raise ValueError("micro_batch_tokens packs each step's examples into rows of that many tokens: it needs packing: true")
    longest = cfg.max_length * (1 if isinstance(cfg, SFTConfig) else 2)  # a pair's row: prompt ++ chosen ++ rejected
    if cfg.micro_batch_tokens and cfg.micro_batch_tokens < longest:
        raise ValueError(f"micro_batch_tokens {cfg.micro_batch_tokens} is less than {'max_length' if longest == cfg.max_length else '2 x max_length'} "
                         f"({longest}), so a long example would fit no micro-batch: raise it to at least {longest}")
    if cfg.micro_batch_tokens and cfg.train.grad_accum_steps > 1:
        raise ValueError("micro_batch_tokens splits each step into micro-batches by tokens, grad_accum_steps by count: "
                         "set one of them (leave grad_accum_steps at 1)")


VALUE_MODELS = ("reward_model", "policy", "shared")


@dataclass(frozen=True)
class PPOConfig:
    """Defaults as TRL's PPOConfig (lr 3e-6, 4 PPO epochs, KL coefficient 0.05, clip 0.2, vf_coef 0.1)."""

    iterations: int = 100  # rollout + update rounds
    rollout_batch_size: int = 32  # prompts sampled together per iteration
    minibatch_size: int = 8  # rollouts per optimizer step
    ppo_epochs: int = 4  # passes over each rollout batch
    lr: float = 3e-6  # AdamW learning rate of policy and value head
    max_grad_norm: float = 1.0  # gradient clipping by global norm
    clip_eps: float = 0.2  # epsilon of the clipped ratio
    value_clip_eps: float | None = 0.2  # clip range of the value loss around the old values; None = off
    vf_coef: float = 0.1  # c_v, weight of the value loss
    ent_coef: float = 0.0  # c_e, weight of the entropy bonus
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE lambda
    beta: float = 0.05  # initial KL coefficient; 0 switches the KL penalty off
    kl_estimator: str = "k1"  # per-token KL estimator in the reward: k1, k2 or k3
    target_kl: float | None = None  # nats per answer; set it to adapt beta (Ziegler et al.); None = fixed
    kl_horizon: int = 10_000  # horizon of the adaptive controller, in samples
    whiten_advantages: bool = True  # normalise advantages over each rollout batch
    missing_eos_penalty: float | None = None  # subtracted from the score of an answer cut off before a stop
    # token (as TRL's option of that name): a reward model never saw such text and may score it well
    sampling: SamplingParams = field(default_factory=SamplingParams)  # how rollouts are sampled
    seed: int = 0  # prompt order and sampling noise (a pipeline sets settings.seed)
    checkpoint_every: int = 0  # save a resumable checkpoint every N iterations; 0 = only at the end
    mixed_precision: str = "no"  # "no", "bf16" or "fp16" (GPU)
    gradient_checkpointing: bool = False  # recompute activations in the update's backward pass (less memory)
    value_model: str = "reward_model"  # the value function V(s_t), as TRL's PPOTrainer builds it: "reward_model"
    # = its own backbone and head, initialised from the reward model's (InstructGPT's choice too: the values
    # start out knowing what scores well); "policy" = its own copy of the policy's backbone, the head at zero;
    # "shared" = a head on the policy's trunk (half the weights, but value gradients reach the policy)

    def __post_init__(self):
        if self.value_model not in VALUE_MODELS:
            raise ValueError(f"value_model must be one of {', '.join(VALUE_MODELS)}, not {self.value_model!r}")

    def train_config(self) -> TrainConfig:
        """The optimizer settings: one optimizer step per minibatch, constant LR."""
        steps = self.iterations * self.ppo_epochs * -(-self.rollout_batch_size // self.minibatch_size)
        return TrainConfig(
            max_steps=steps, batch_size=self.minibatch_size, lr=self.lr, lr_schedule="constant",
            max_grad_norm=self.max_grad_norm, seed=self.seed, mixed_precision=self.mixed_precision,
            gradient_checkpointing=self.gradient_checkpointing,
        )


@dataclass(frozen=True)
class GRPOConfig:
    """Defaults as TRL's GRPOConfig (8 answers a prompt, lr 1e-6, beta 0, clip 0.2, loss "dapo", the KL term
    weighted by the ratio, one optimisation pass per rollout batch, answers up to 256 tokens at temperature 1)."""

    iterations: int = 100  # rollout + update rounds
    prompts_per_batch: int = 8  # prompts sampled per iteration; each gets group_size answers
    group_size: int = 8  # G: answers per prompt, compared with each other (TRL's num_generations)
    minibatch_size: int | None = None  # answers per optimizer step; None: the whole rollout batch in one step
    epochs: int = 1  # optimisation passes over each rollout batch (TRL's num_iterations); > 1 needs the ratio
    lr: float = 1e-6  # AdamW learning rate
    lr_schedule: str = "linear"  # "constant", "linear" or "cosine" decay to 0 over the run (as TRL)
    warmup_steps: int = 0  # linear warm-up of the learning rate, in optimizer steps
    max_grad_norm: float = 1.0  # gradient clipping by global norm
    advantage: str = "grpo"  # "grpo": (r - mean) / std over the group; "batch_std": (r - group mean) / std over
    # the rollout batch (TRL's scale_rewards="batch"); "dr_grpo": r - mean (no std scaling)
    loss_type: str = "dapo"  # "grpo": mean over answers of each answer's token mean; "dapo": mean over the rollout's
    # tokens; "sequence": one action an answer (its log-prob ratio summed over its tokens, clipped), mean over answers
    clip_eps_low: float = 0.2  # ratio clipped below at 1 - clip_eps_low
    clip_eps_high: float = 0.2  # ratio clipped above at 1 + clip_eps_high (DAPO's clip-higher: e.g. 0.28)
    beta: float = 0.0  # weight of the k3 KL to the reference in the loss; 0: no reference model is kept
    unbiased_kl: bool = True  # the KL term's k3 times the ratio pi / pi_old, so its gradient is that of
    # KL(pi || pi_ref) (TRL's use_bias_correction_kl); False: plain k3, whose gradient is the forward KL's
    missing_eos_penalty: float | None = None  # subtracted from the score of an answer cut off before a stop token
    sampling: SamplingParams = field(default_factory=SamplingParams)  # how answers are sampled
    seed: int = 0  # prompt order and sampling noise (a pipeline sets settings.seed)
    checkpoint_every: int = 0  # save a resumable checkpoint every N iterations; 0 = only at the end
    mixed_precision: str = "no"  # "no", "bf16" or "fp16" (GPU)
    gradient_checkpointing: bool = False  # recompute activations in the backward pass (less memory)

    kl_in_reward = False  # GRPO puts its KL in the loss

    def train_config(self) -> TrainConfig:
        """The optimizer settings: one optimizer step per minibatch, over every iteration."""
        batch = self.prompts_per_batch * self.group_size
        minibatch = self.minibatch_size or batch
        steps = self.iterations * self.epochs * -(-batch // minibatch)
        return TrainConfig(
            max_steps=steps, batch_size=minibatch, lr=self.lr, lr_schedule=self.lr_schedule,
            warmup_steps=self.warmup_steps, max_grad_norm=self.max_grad_norm, seed=self.seed,
            mixed_precision=self.mixed_precision, gradient_checkpointing=self.gradient_checkpointing,
        )


@dataclass(frozen=True)
class RLOOConfig(GRPOConfig):
    """REINFORCE leave-one-out, with defaults as TRL's RLOOConfig (2 answers a prompt, beta 0.05 as a KL
    penalty in the reward, advantages not scaled). Each answer is one action: its advantage is its
    KL-penalised score minus the mean of the other answers' to the same prompt, and the update is the
    clipped surrogate of the answer's probability ratio with that advantage (one pass: plain REINFORCE with a
    baseline, A * grad log pi(y | x), as the RLOO paper and TRL's RLOOTrainer)."""

    group_size: int = 2  # K: answers per prompt (TRL's num_generations for RLOO)
    beta: float = 0.05  # KL penalty in the reward: score - beta * sum_t k1_t over the answer's tokens
    advantage: str = "rloo"  # the leave-one-out baseline; the only choice
    loss_type: str = "sequence"  # one action an answer: the ratio of its probability, REINFORCE's gradient (as TRL)
    kl_in_reward = True  # RLOO folds the KL into the score, the baseline then sees it

    def __post_init__(self):
        if not self.unbiased_kl:
            raise ValueError("unbiased_kl weights the KL term of GRPO's loss; RLOO's KL is a penalty in the reward "
                             "(beta), with no term in the loss to weight: leave unbiased_kl out")
