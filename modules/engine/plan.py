"""``topiary plan``: memory, disk and time of a prune, estimated from ``config.json`` alone.

Nothing here reads a weight or imports torch: the estimate is arithmetic on the
architecture of a LLaMA-style decoder (q/k/v/o attention with grouped KV heads, a gated
gate/up/down MLP, two norms per block), which covers LLaMA, Mistral and Qwen-style
checkpoints, and on mixtures of experts (Mixtral, Qwen-MoE, DeepSeek-V3 with its latent
attention, gpt-oss): each expert's three matrices count as linears of the block, the
router as a dense parameter; every block is taken as the largest (a mixture-of-experts
block, or a dense one of the same model where that holds more), except in the parameter
count; a forward multiplies by the top-k experts only.
The run it describes is the per-block one: one decoder block at a time on
the device, the calibration activations between blocks on the host (in memory or in a
memory-mapped file), double-buffered (a block's inputs and its outputs). With an expert
group of ``N`` (``prune.expert_group``), a mixture-of-experts block is its trunk (every weight
but the routed experts': attention, norms, router, shared experts) held whole and its
experts ``N`` at a time in every stage, with their statistics; each forward over a batch
of windows reads the block's experts once, group by group. The evaluation (``eval``, not
part of the prune's peak) streams whole blocks.

The figures (bytes, FLOPs) follow these rules; ``MB``/``GB`` are decimal (``1e6``/``1e9``):

- block weights: the block's parameters in the compute dtype;
- activations: ``nsamples * seqlen * hidden * 4`` bytes (fp32), two of them;
- statistics, per distinct linear input of a block (q/k/v share one, gate/up share one):
  ``sq_norm`` (``C_in`` fp32) for every data-driven method, the Gram matrix ``X^T X``
  (``C_in^2`` fp32) for SparseGPT and ADMM, and for GBLM the gradients (one fp32 per
  weight of the block); an expert's twice in the statistics pass under ``moe_calibration:
  routed`` (the routed tokens' sums and every token's, for the fallback);
- the working set of a forward over a batch of ``b`` windows: fp32 hidden states, q/k/v,
  the attention scores ``heads * seqlen^2`` and the three MLP products;
- mask selection (one linear at a time): an fp32 copy of ``W``, its scores, int64 sort
  indices and the bool mask; the update (SparseGPT, ADMM): the fp32 copy, the result, the
  mask and two ``C_in^2`` fp32 matrices (a factor and the inverse);
- weights read: the block once per stage that loads it (statistics, masks, update,
  propagate); with ``G`` expert groups, a pass (statistics, propagate) reads the experts once
  per batch of windows, collecting the first group's statistics, and the statistics stage adds
  one pass per later group: the trunk read and run again, that group read once per batch and
  run on its routed tokens;
- time: FLOPs over an assumed device throughput (``tflops``), reads and writes over an
  assumed disk rate; a forward is ``2 * params * tokens`` plus ``4 * seqlen^2 * heads *
  head_dim`` per window; the Gram sum ``2 * tokens * C_in^2``; a Cholesky factor and inverse ``C_in^3``;
  an ADMM iteration ``2 * C_out * C_in^2``; a sort ``2 n log2 n``.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from modules.errors import TopiaryError
from modules.pruning.traits import ADMM_ITERS, ADMM_KS, FP32_MAX_INPUTS, TRAITS

REFERENCE_CONFIG = Path(__file__).resolve().parents[1] / "assets" / "reference" / "config.json"

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]I?B|B)\s*$", re.IGNORECASE)

DEVICE_RESERVE = 0.10  # of device memory kept free (CUDA context, allocator fragmentation)
HOST_SHARE = 0.5  # activations stay in memory when both buffers take at most this share of host memory
EVAL_TOKENS = 340_000  # about wikitext-2's test split with a 32k LLaMA tokenizer
QK_NORMS = frozenset({"qwen3", "qwen3_moe"})  # model types with per-head q/k RMS norms
STAGES = ("windows", "statistics", "masks", "update", "propagate", "assemble", "eval")


def parse_size(text: str, what: str = "memory") -> int:
    """Bytes of a size such as ``24GB``, ``80GiB`` or ``512MB`` (GB = 1e9, GiB = 2**30).

    Raises:
        TopiaryError: not a positive number followed by a unit.
    """
    match = SIZE.match(text)
    if not match or float(match.group(1)) <= 0:
        raise TopiaryError(f"{what}: {text!r} is not a size (expected like 24GB, 80GiB or 512MB)")
    return int(float(match.group(1)) * UNITS[match.group(2).upper()])


def _hub_config(name: str) -> Path:
    """The ``config.json`` of Hub id ``name`` in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache  # no torch; only for a Hub id

    found = try_to_load_from_cache(name, "config.json")
    if isinstance(found, str):
        return Path(found)
    raise TopiaryError(
        f"model: {name!r} is no local folder or file, and the local Hugging Face cache has no "
        f"config.json for it; download that file (`hf download {name} config.json`) or give a path"
    )


def config_path(model: str) -> Path:
    """Where ``config.json`` of ``model`` is: ``embedded``, a folder, a JSON file, or a cached Hub id.

    Raises:
        TopiaryError: a path that does not exist, a folder without ``config.json``, or a
            Hub id whose config is not in the local cache.
    """
    if model == "embedded":
        return REFERENCE_CONFIG
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TopiaryError(f"model: {model} is a folder without config.json")
        return path / "config.json"
    if path.is_file():
        return path
    if re.fullmatch(r"[\w.-]+/[\w.-]+", model) and not model.startswith("."):
        return _hub_config(model)
    raise TopiaryError(f"model: {model} does not exist (expected a model folder, a config.json or a Hub id)")


@dataclass(frozen=True)
class Arch:
    """The numbers of a LLaMA-style decoder that the estimate needs (from ``config.json``)."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    dtype: str
    context: int | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    experts: int = 0  # routed experts of a mixture-of-experts block; 0: a dense model
    experts_per_token: int = 0
    expert_intermediate: int = 0
    shared_intermediate: int = 0  # the shared experts' summed width (DeepSeek, Qwen2-MoE)
    dense_blocks: int = 0  # blocks of a mixture of experts with a dense MLP (DeepSeek-V3's first 3)
    mla: tuple[int, int, int, int, int] | None = None  # DeepSeek's q_lora, kv_lora, nope, rope, v dims
    qk_norm: int = 0  # parameters of the per-head q/k norms (Qwen3)

    def _attention(self) -> dict[str, tuple[int, int]]:
        h = self.hidden
        if self.mla is None:
            q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
            return {
                "self_attn.q_proj": (q, h),
                "self_attn.k_proj": (kv, h),
                "self_attn.v_proj": (kv, h),
                "self_attn.o_proj": (h, q),
            }
        q_lora, kv_lora, nope, rope, v = self.mla
        q = {"self_attn.q_proj": (self.heads * (nope + rope), h)}
        if q_lora:
            q = {
                "self_attn.q_a_proj": (q_lora, h),
                "self_attn.q_b_proj": (self.heads * (nope + rope), q_lora),
            }
        return {
            **q,
            "self_attn.kv_a_proj_with_mqa": (kv_lora + rope, h),
            "self_attn.kv_b_proj": (self.heads * (nope + v), kv_lora),
            "self_attn.o_proj": (h, self.heads * v),
        }

    @staticmethod
    def _mlp(prefix: str, width: int, hidden: int) -> dict[str, tuple[int, int]]:
        return {
            f"{prefix}.gate_proj": (width, hidden),
            f"{prefix}.up_proj": (width, hidden),
            f"{prefix}.down_proj": (hidden, width),
        }

    def linears(self, moe: bool = True, group: int | None = None) -> dict[str, tuple[int, int]]:
        """``(C_out, C_in)`` of every weight matrix that one block prunes, in the order the block
        calls them: with ``moe`` (and experts) those of a mixture-of-experts block, each
        expert's three matrices apart (the router stays dense: not here), else a dense block's.
        ``group``: only that many of the experts (those one expert group holds; 0: the trunk)."""
        if not (moe and self.experts):
            return {**self._attention(), **self._mlp("mlp", self.intermediate, self.hidden)}
        out = self._attention()
        for e in range(self.experts if group is None else min(group, self.experts)):
            out.update(self._mlp(f"mlp.experts.{e}", self.expert_intermediate, self.hidden))
        if self.shared_intermediate:
            out.update(self._mlp("mlp.shared_experts", self.shared_intermediate, self.hidden))
        return out

    def input_widths(self, moe: bool = True, group: int | None = None) -> dict[str, int]:
        """Width of each distinct linear input of a block, by the linear that first reads it
        (q/k/v share one; an MLP's gate/up share one); ``group`` as in :meth:`linears`."""
        return {
            name: c_in
            for name, (_, c_in) in self.linears(moe, group).items()
            if not name.endswith(("k_proj", "v_proj", "up_proj", "kv_a_proj_with_mqa"))
        }

    def inputs(self, moe: bool = True) -> list[int]:
        """Widths of a block's distinct linear inputs (see :meth:`input_widths`)."""
        return list(self.input_widths(moe).values())

    def linear_params(self, moe: bool = True, group: int | None = None) -> int:
        """Weights of one block's prunable matrices (see :meth:`linears`)."""
        return sum(o * i for o, i in self.linears(moe, group).values())

    def expert_params(self) -> int:
        """Weights of one routed expert (its three matrices)."""
        return 3 * self.expert_intermediate * self.hidden

    def active_params(self) -> int:
        """Weights of the largest block that one token multiplies by (its top-k experts only)."""
        idle = max(self.experts - self.experts_per_token, 0)
        return self.linear_params() - idle * self.expert_params()

    def block_params(self, moe: bool = True, group: int | None = None) -> int:
        """All parameters of one block: its matrices, their biases, the norms and a router;
        ``group`` as in :meth:`linears` (0: the trunk, every parameter but the routed experts')."""
        lin = self.linears(moe, group)
        bias = sum(lin[n][0] for n in lin if n.startswith("self_attn")) if self.attention_bias else 0
        bias += sum(lin[n][0] for n in lin if n.startswith("mlp")) if self.mlp_bias else 0
        norms = 2 * self.hidden + (self.mla[0] + self.mla[1] if self.mla else 0) + self.qk_norm
        router = self.experts * self.hidden if moe and self.experts else 0
        return self.linear_params(moe, group) + bias + norms + router

    def embed_params(self) -> int:
        """Embeddings, final norm and (unless tied) the LM head."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def total_params(self) -> int:
        """Every parameter of the model (biases of the experts and attention sinks left out)."""
        sparse = self.layers - self.dense_blocks
        return (
            sparse * self.block_params() + self.dense_blocks * self.block_params(False) + self.embed_params()
        )


def _int(cfg: dict, key: str, where: str) -> int:
    value = cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise TopiaryError(
            f"model: {where} has {key}={value!r}, expected a positive integer "
            "(topiary plan reads LLaMA-style configs: hidden_size, intermediate_size, num_hidden_layers, ...)"
        )
    return value


def arch_from_config(cfg: dict, where: str = "config.json") -> Arch:
    """The :class:`Arch` of a parsed ``config.json`` (``text_config`` of a multimodal one).

    Raises:
        TopiaryError: a key the estimate needs is missing or not a positive integer, or
            the heads do not divide the hidden width.
    """
    if not isinstance(cfg, dict):
        raise TopiaryError(f"model: {where} is not a JSON object")
    cfg = cfg.get("text_config", cfg) if isinstance(cfg.get("text_config"), dict) else cfg
    hidden, heads = _int(cfg, "hidden_size", where), _int(cfg, "num_attention_heads", where)
    kv = _int(cfg, "num_key_value_heads", where) if cfg.get("num_key_value_heads") is not None else heads
    head_dim = _int(cfg, "head_dim", where) if cfg.get("head_dim") is not None else hidden // heads
    if cfg.get("head_dim") is None and hidden % heads:
        raise TopiaryError(f"model: {where}: hidden_size {hidden} is not a multiple of {heads} heads")
    if heads % kv:
        raise TopiaryError(f"model: {where}: {heads} attention heads are not a multiple of {kv} KV heads")
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32")
    context = cfg.get("max_position_embeddings")
    return Arch(
        name=str(cfg.get("_name_or_path") or (cfg.get("architectures") or ["?"])[0]),
        layers=_int(cfg, "num_hidden_layers", where),
        hidden=hidden,
        intermediate=_int(cfg, "intermediate_size", where),
        heads=heads,
        kv_heads=kv,
        head_dim=head_dim,
        vocab=_int(cfg, "vocab_size", where),
        tied=bool(cfg.get("tie_word_embeddings", False)),
        dtype=dtype if dtype in DTYPE_BYTES else "float32",
        context=context if isinstance(context, int) else None,
        attention_bias=bool(cfg.get("attention_bias", False)),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        qk_norm=2 * head_dim if cfg.get("model_type") in QK_NORMS else 0,
        **_moe(cfg, where),
    )


def _moe(cfg: dict, where: str) -> dict:
    """The mixture-of-experts fields of :class:`Arch` from a config (none for a dense model):
    ``num_local_experts`` (Mixtral, gpt-oss), ``num_experts`` (Qwen-MoE, OLMoE) or
    ``n_routed_experts`` (DeepSeek); the experts' width ``moe_intermediate_size``, else
    ``intermediate_size``; dense blocks from ``first_k_dense_replace`` or ``mlp_only_layers``
    and ``decoder_sparse_step``; DeepSeek's multi-head latent attention from ``kv_lora_rank``."""
    out: dict = {}
    if cfg.get("kv_lora_rank"):
        dims = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
        out["mla"] = tuple(0 if k == "q_lora_rank" and not cfg.get(k) else _int(cfg, k, where) for k in dims)
    experts = next(
        (cfg[k] for k in ("num_local_experts", "num_experts", "n_routed_experts") if cfg.get(k)), 0
    )
    if not experts:
        return out
    layers = _int(cfg, "num_hidden_layers", where)
    step = cfg.get("decoder_sparse_step") or 1
    only = set(cfg.get("mlp_only_layers") or ())
    first = cfg.get("first_k_dense_replace") or 0
    dense = sum(1 for i in range(layers) if i < first or i in only or (i + 1) % step)
    width = cfg.get("moe_intermediate_size") or _int(cfg, "intermediate_size", where)
    shared = (cfg.get("n_shared_experts") or 0) * width + (cfg.get("shared_expert_intermediate_size") or 0)
    return out | {
        "experts": int(experts),
        "experts_per_token": int(cfg.get("num_experts_per_tok") or 1),
        "expert_intermediate": int(width),
        "shared_intermediate": int(shared),
        "dense_blocks": dense,
    }


def read_arch(model: str) -> tuple[Arch, Path]:
    """The :class:`Arch` of ``model`` (see :func:`config_path`) and the file it came from."""
    path = config_path(model)
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise TopiaryError(f"model: {path} is not readable JSON: {' '.join(str(err).split())}") from None
    return arch_from_config(cfg, str(path)), path


@dataclass(frozen=True)
class Stage:
    """One step of the run: peak device and host memory, disk its results hold at their peak,
    and the FLOPs, weights read and time of the step over the whole run (every block)."""

    name: str
    device: int
    host: int
    disk: int
    flops: float
    seconds: float
    note: str = ""
    read: int = 0  # weights read from disk over the run


@dataclass
class Plan:
    """What :func:`make_plan` estimated and chose; sizes in bytes."""

    arch: Arch
    method: str
    nsamples: int
    seqlen: int
    dtype: str
    device_memory: int
    host_memory: int
    tflops: float
    disk_gbps: float
    block_bytes: int
    activation_bytes: int  # one buffer; double-buffered runs hold two
    statistics_bytes: int
    activations: str  # "memory", "mmap", or "none" (magnitude reads no data)
    batch_size: int
    fits: bool
    admm_precision: str | None
    gradients: str | None = None  # GBLM: where the block-wise backward keeps the blocks' inputs
    stages: list[Stage] = field(default_factory=list)
    expert_group: int | None = None  # routed experts held at a time; None: the whole block
    loaded_bytes: int = 0  # the largest block's weights held at a time (trunk + one expert group)
    largest_group: int | None = None  # of a mixture of experts: the largest group that fits the device
    # the largest group that fits, and the largest at the largest batch any group fits (the fastest:
    # the experts are read once per batch): group -> (batch size, prune seconds)
    group_choices: dict[int, tuple[int, float]] = field(default_factory=dict)
    ignored_group: int | None = None  # an expert group asked of a dense model (it has no experts)

    def stage(self, name: str) -> Stage:
        """The stage called ``name``."""
        return next(s for s in self.stages if s.name == name)


def forward_bytes(arch: Arch, batch: int, seqlen: int) -> int:
    """fp32 working set of one block's forward over ``batch`` windows (inputs, q/k/v, scores, MLP)."""
    mlp = arch.experts_per_token * arch.expert_intermediate + arch.shared_intermediate if arch.experts else 0
    per_token = (
        2 * arch.hidden + (arch.heads + 2 * arch.kv_heads) * arch.head_dim + 3 * (mlp or arch.intermediate)
    )
    return 4 * batch * (seqlen * per_token + arch.heads * seqlen * seqlen)


def forward_flops(arch: Arch, windows: int, seqlen: int) -> float:
    """FLOPs of one block's forward over ``windows`` windows."""
    return (
        2.0 * arch.active_params() * windows * seqlen + 4.0 * windows * seqlen**2 * arch.heads * arch.head_dim
    )


def statistics_bytes(
    arch: Arch, method: str, group: int | None = None, copies: int = 1, moe: bool = True
) -> int:
    """Bytes of the statistics one block needs for ``method`` (see the module docstring), for
    ``group`` experts (:meth:`Arch.linears`), each expert's sums held ``copies`` times."""
    needs = TRAITS[method].reads
    widths = [
        (w, copies if name.startswith("mlp.experts.") else 1)
        for name, w in arch.input_widths(moe, group).items()
    ]
    total = 4 * sum(n * w for w, n in widths) if "sq_norm" in needs else 0
    total += 4 * sum(n * w * w for w, n in widths) if "gram" in needs else 0
    return total + (4 * arch.linear_params(moe, group) if "grad" in needs else 0)


def gradient_files(blocks: int, in_memory: bool) -> tuple[int, int]:
    """GBLM's block-wise backward on disk: ``(blocks per segment, most block inputs' files)``.

    The files are the segments' first blocks' inputs and two upstream gradients; with the
    inputs not in memory, also one segment's recomputed inputs (``modules.engine.backward``).
    """
    every = math.isqrt(blocks - 1) + 1
    return every, (-(-blocks // every) if in_memory else 2 * every) + 2


def _sort_flops(n: int, width: int) -> float:
    return 2.0 * n * math.log2(max(width, 2))


def _update(arch: Arch, method: str) -> tuple[int, float]:
    """Working set of the largest linear's update and FLOPs of one block's update."""
    work, flops = 0, 0.0
    for out, inp in arch.linears().values():
        work = max(work, 9 * out * inp + 8 * inp * inp)  # fp32 W and result, bool mask, factor + inverse
        flops += inp**3
        if method == "sparsegpt":
            flops += 2.0 * out * inp * inp
        else:
            flops += ADMM_ITERS * 2.0 * out * inp * inp
            flops += ADMM_KS * _sort_flops(out * inp, inp) if method == "admm-grad" else 0.0
    return work, flops


def fmt_bytes(n: float) -> str:
    """``n`` bytes in decimal units, as ``topiary plan`` prints them (``14.50 GB``)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B" if n else "0"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def _time(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 60:.1f} min" if s >= 60 else f"{s:.1f} s"


def host_memory() -> int:
    """Physical memory of this machine in bytes (0 where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def make_plan(
    arch: Arch,
    *,
    method: str,
    device_memory: int,
    host_memory: int,
    nsamples: int,
    seqlen: int,
    dtype: str | None = None,
    tflops: float = 50.0,
    disk_gbps: float = 1.0,
    eval_tokens: int = EVAL_TOKENS,
    expert_group: int | None = None,
    moe_calibration: str = "routed",
) -> Plan:
    """Estimate every stage of pruning ``arch`` with ``method``, and the settings it would choose.

    Args:
        arch: The architecture (:func:`arch_from_config`).
        method: A method of :data:`modules.pruning.traits.TRAITS`.
        device_memory: Bytes of the device that runs one block.
        host_memory: Bytes of host memory (activations live there, or in a memory-mapped file).
        nsamples: Calibration windows.
        seqlen: Tokens per window (calibration and evaluation).
        dtype: Compute dtype of the weights; default the checkpoint's.
        tflops: Assumed effective device throughput, in 1e12 FLOP/s.
        disk_gbps: Assumed disk rate (reads and writes), in GB/s.
        eval_tokens: Tokens of the perplexity evaluation.
        expert_group: Routed experts held at a time (``prune.expert_group``; None: a whole
            block). For a mixture of experts the plan also gives the largest group that fits.
        moe_calibration: ``routed`` holds two sums per expert in the statistics pass (the
            routed tokens' and every token's, for the fallback), ``all`` one.

    Raises:
        TopiaryError: an unknown method or dtype, or a non-positive count or rate.
    """
    if method not in TRAITS:
        raise TopiaryError(f"method: {method!r} is not one of {', '.join(TRAITS)}")
    dtype = dtype or arch.dtype
    if dtype not in DTYPE_BYTES:
        raise TopiaryError(f"dtype: {dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
    counts = (("nsamples", nsamples), ("seqlen", seqlen), ("tflops", tflops), ("disk", disk_gbps))
    for key, value in (*counts, ("expert_group", 1 if expert_group is None else expert_group)):
        if not value > 0:
            raise TopiaryError(f"{key}: {value} must be positive")
    if moe_calibration not in ("routed", "all"):
        raise TopiaryError(f"moe_calibration: {moe_calibration!r} is not one of routed, all")

    def build(group: int | None) -> Plan:
        run = _Estimate(
            arch, method, nsamples, seqlen, dtype, device_memory, host_memory, tflops * 1e12, disk_gbps * 1e9,
            group, moe_calibration,
        )  # fmt: skip
        return run.plan(tflops, disk_gbps, eval_tokens)

    plan = build(expert_group)
    plan.ignored_group = None if arch.experts else expert_group
    if arch.experts:
        plan.largest_group = _largest(lambda n: build(n).fits, arch.experts)
        most = build(1).batch_size  # a smaller group leaves more room for the batch
        fastest = _largest(lambda n: (p := build(n)).fits and p.batch_size == most, arch.experts)
        for n in filter(None, (plan.largest_group, fastest)):
            chosen = build(n)
            plan.group_choices.setdefault(n, (chosen.batch_size, prune_seconds(chosen)))
        choices = plan.group_choices
        if len(choices) == 2 and choices[fastest][1] >= choices[plan.largest_group][1]:
            del plan.group_choices[fastest]  # no faster than the largest group (or the whole block)
    return plan


def prune_seconds(plan: Plan) -> float:
    """The estimated time of the prune: every stage's but the evaluation's."""
    return sum(s.seconds for s in plan.stages if s.name != "eval")


def _largest(fits, most: int) -> int | None:
    """The largest ``n`` in ``1..most`` with ``fits(n)`` (false from some ``n`` on), else None."""
    low, high = 0, most  # fits(low) holds (0: none tried), the answer is at most high
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low or None


class _Estimate:
    """The figures of one prune that every stage's estimate shares, and each stage's estimate
    (``rate`` in FLOP/s, ``disk_rate`` in bytes/s).

    ``group``: routed experts held at a time (None, or at least the block's experts: all of
    them). A block is then its trunk (every weight but the routed experts': attention, norms,
    router, shared experts) and its experts, loaded ``group`` at a time for every stage; the
    statistics are held for one group; each forward over a batch of windows reads the
    experts from disk group by group, so a pass reads them once per batch; each expert group
    after the first has a statistics pass of its own. The largest block
    of a model with dense blocks (DeepSeek-V3's first three) is the larger of the two kinds.
    """

    def __init__(
        self,
        arch: Arch,
        method: str,
        nsamples: int,
        seqlen: int,
        dtype: str,
        device_memory: int,
        host_memory: int,
        rate: float,
        disk_rate: float,
        group: int | None = None,
        moe_calibration: str = "routed",
    ) -> None:
        self.arch, self.method, self.traits = arch, method, TRAITS[method]
        self.rate, self.disk_rate, self.dtype, self.device_memory = rate, disk_rate, dtype, device_memory
        self.nsamples, self.seqlen, self.host_memory = nsamples, seqlen, host_memory
        self.width, self.n, self.data = DTYPE_BYTES[dtype], arch.layers, not self.traits.data_free
        self.group = group if arch.experts and group is not None and group < arch.experts else None
        copies = 2 if moe_calibration == "routed" else 1
        self.block = arch.block_params() * self.width
        self.loaded = self._larger(lambda moe: arch.block_params(moe, self.group)) * self.width
        self.stats = self._larger(lambda moe: statistics_bytes(arch, method, self.group, copies, moe))
        self.stats_used = self._larger(lambda moe: statistics_bytes(arch, method, self.group, 1, moe))
        self.acts = nsamples * seqlen * arch.hidden * 4
        activations = "memory" if 2 * self.acts <= HOST_SHARE * host_memory else "mmap"
        self.activations = activations if self.data else "none"
        self.resident = 2 * self.acts if self.activations == "memory" else 0
        self.budget = (1 - DEVICE_RESERVE) * device_memory
        free = self.budget - self.loaded - self.stats
        self.batch = 1
        while self.batch * 2 <= nsamples and forward_bytes(arch, self.batch * 2, seqlen) <= free:
            self.batch *= 2
        self.fwd = forward_bytes(arch, self.batch, seqlen) if self.data else 0
        self.fwd_flops = forward_flops(arch, nsamples, seqlen)
        self.masks_bytes = arch.linear_params()  # one bool per prunable weight
        experts = arch.experts * arch.expert_params() * self.width
        batches = -(-nsamples // self.batch) if self.group else 1
        self.pass_reads = self.n * (self.block + (batches - 1) * experts)  # the weights read by a pass
        self.later_passes, self.later_reads, self.later_flops = self._later_groups(batches)

    def _later_groups(self, batches: int) -> tuple[int, int, float]:
        """The statistics passes of the expert groups after the first: ``(passes per block, weights
        read, FLOPs)`` over the run. Each loads and runs the trunk, and reads its group once per
        batch, running those experts on their routed tokens; none without expert groups."""
        a = self.arch
        if not self.group:
            return 0, 0, 0.0
        passes, rest = -(-a.experts // self.group) - 1, a.experts - self.group
        trunk = a.block_params(True, 0) * self.width
        reads = self.n * (passes * trunk + batches * rest * a.expert_params() * self.width)
        routed = 2.0 * self.nsamples * self.seqlen * a.experts_per_token * a.expert_params()
        return passes, reads, self.n * (passes * (self.fwd_flops - routed) + routed * rest / a.experts)

    def _larger(self, size) -> int:
        """``size(moe)`` of the largest block: a mixture-of-experts block's, or a dense block's."""
        return max(size(True), size(False) if self.arch.dense_blocks else 0)

    def plan(self, tflops: float, disk_gbps: float, eval_tokens: int) -> Plan:
        """Every stage's estimate, and the settings."""
        arch = self.arch
        statistics, gradients = self.statistics()
        stages = [self.windows(), statistics, self.masks(), self.update(), self.propagate(), self.assemble()]
        stages.append(self.evaluation(eval_tokens))
        precision = None
        if self.method in ("admm", "admm-grad"):
            wide = max(arch.inputs()) > FP32_MAX_INPUTS
            precision = f"fp32 up to {FP32_MAX_INPUTS} inputs, mixed above" if wide else "fp32"
        return Plan(
            arch=arch,
            method=self.method,
            nsamples=self.nsamples,
            seqlen=self.seqlen,
            dtype=self.dtype,
            device_memory=self.device_memory,
            host_memory=self.host_memory,
            tflops=tflops,
            disk_gbps=disk_gbps,
            block_bytes=self.block,
            activation_bytes=self.acts,
            statistics_bytes=self.stats,
            activations=self.activations,
            batch_size=self.batch,
            fits=max(s.device for s in stages if s.name != "eval") <= self.budget,
            admm_precision=precision,
            gradients=gradients,
            stages=stages,
            expert_group=self.group,
            loaded_bytes=self.loaded,
        )

    def windows(self) -> Stage:
        a, data = self.arch, self.data
        embed = a.vocab * a.hidden * self.width  # the input embedding (capture); the head is only for eval
        return Stage(
            "windows",
            embed + self.batch * self.seqlen * (a.hidden * 4 + 8) if data else 0,
            self.resident,
            (2 * self.acts if self.activations == "mmap" else 0) if data else 0,
            0.0,
            0.0,
            "capture block 0's inputs" if data else f"skipped: {self.method} reads no data",
        )

    def statistics(self) -> tuple[Stage, str | None]:
        """The statistics stage, and for GBLM where the block-wise backward keeps the blocks' inputs."""
        a, n, data = self.arch, self.n, self.data
        gram = "gram" in self.traits.reads
        gram_flops = 2.0 * self.nsamples * self.seqlen * sum(w * w for w in a.inputs()) if gram else 0
        flops = n * (self.fwd_flops + gram_flops) + self.later_flops if data else 0.0
        note = "dense forward + sums per distinct input" if data else "skipped"
        if data and self.later_passes:
            note += f", then a pass per later expert group ({self.later_passes})"
        disk = 2 * statistics_bytes(a, self.method) if data else 0  # this block's and the next's, for resume
        host, gradients = 0, None
        if "grad" in self.traits.reads:
            host, more_flops, more_disk, gradients = self._gradients()
            flops, disk = flops + more_flops, disk + more_disk
            note = "gradients: forward sweep, block-wise backward by segments"
        device = self.loaded + self.stats + self.fwd if data else 0
        read = self.pass_reads + self.later_reads if data else 0
        stage = Stage(
            "statistics", device, self.resident + self.loaded + host, disk, flops, self._seconds(flops, read),
            note, read,
        )  # fmt: skip
        return stage, gradients

    def _seconds(self, flops: float, read: int) -> float:
        return flops / self.rate + read / self.disk_rate

    def _gradients(self) -> tuple[int, float, int, str]:
        """GBLM's block-wise backward (forward sweep, then recompute + backprop by segments of
        ``ceil(sqrt(n))`` blocks, block inputs in the model's dtype; modules/engine/backward.py):
        ``(host bytes, FLOPs, disk bytes, where the blocks' inputs are)``."""
        a, n = self.arch, self.n
        inputs = self.nsamples * self.seqlen * a.hidden * self.width
        in_memory = n * inputs <= HOST_SHARE * self.host_memory
        every, kept = gradient_files(n, in_memory)
        host = (n + 1) * inputs if in_memory else 3 * inputs
        flops = (
            n * (3 if in_memory else 4) * self.fwd_flops
            + 6.0 * self.nsamples * self.seqlen * a.hidden * a.vocab
        )
        disk = kept * inputs + n * 4 * a.linear_params()
        where = (
            f"block inputs in memory ({n} x {fmt_bytes(inputs)} <= {HOST_SHARE:.0%} of host memory); "
            f"each segment's first (every {every} blocks) on disk for resume"
            if in_memory
            else f"block inputs on disk: each segment's first (every {every} blocks) kept, the others "
            f"recomputed (at most {kept} x {fmt_bytes(inputs)} on disk instead of {n}); one more forward"
        )
        return host, flops, disk, where

    def masks(self) -> Stage:
        if not self.traits.masks_step:
            return Stage("masks", 0, 0, 0, 0.0, 0.0, f"none: {self.method} selects in its update")
        a = self.arch
        flops = self.n * _sort_flops(a.linear_params(), a.hidden)
        mask_work = 17 * max(o * i for o, i in a.linears().values())  # fp32 W and scores, int64 indices, mask
        grads = self._larger(lambda moe: 4 * a.linear_params(moe, self.group))
        device = self.loaded + mask_work + (grads if "grad" in self.traits.reads else 0)
        note = "sort per row; every block's masks kept for the output"
        read = self.n * self.block
        return Stage(
            "masks",
            device,
            self.resident + self.loaded,
            self.n * self.masks_bytes,
            flops,
            self._seconds(flops, read),
            note,
            read,
        )

    def update(self) -> Stage:
        if not self.traits.update_step:
            return Stage("update", 0, 0, 0, 0.0, 0.0, f"none: {self.method} only masks")
        work, flops = _update(self.arch, self.method)
        what = "OBS column sweep" if self.method == "sparsegpt" else f"ADMM, {ADMM_ITERS} iterations"
        total, read = self.n * flops, self.n * self.block
        return Stage(
            "update",
            self.loaded + self.stats_used + work,
            self.resident + self.loaded,
            self.block,
            total,
            self._seconds(total, read),
            what,
            read,
        )

    def propagate(self) -> Stage:
        data = self.data
        flops = self.n * self.fwd_flops if data else 0.0
        note = "pruned forward -> next block's inputs" if data else "skipped"
        device = self.loaded + self.fwd if data else 0
        read = self.pass_reads if data else 0
        host = self.resident + self.loaded
        return Stage("propagate", device, host, 0, flops, self._seconds(flops, read), note, read)

    def assemble(self) -> Stage:
        written = self.arch.total_params() * self.width + self.masks_bytes * self.n
        return Stage(
            "assemble", 0, self.block, written, 0.0, written / self.disk_rate, "shards + index + masks"
        )

    def evaluation(self, eval_tokens: int) -> Stage:
        a, seqlen = self.arch, self.seqlen
        windows = max(1, eval_tokens // seqlen)
        logits = self.batch * seqlen * a.vocab * 4 + a.embed_params() * self.width
        flops = self.n * forward_flops(a, windows, seqlen) + 2.0 * windows * seqlen * a.hidden * a.vocab
        acts = 2 * windows * seqlen * a.hidden * 4
        return Stage(
            "eval",
            max(self.block + forward_bytes(a, self.batch, seqlen), logits),
            acts if acts <= HOST_SHARE * self.host_memory else self.block,  # else memory-mapped
            0,
            flops,
            flops / self.rate,
            f"perplexity, {windows} windows, streamed",
        )


def run_disk(plan: Plan) -> tuple[int, int]:
    """Bytes a prune holds on disk at most: ``(work folder, output folder)``.

    The work folder keeps the resume state: the activations when memory-mapped (``windows``),
    two blocks' statistics (``statistics``), every block's masks (``masks``) and every
    pruned block's weights until the model is assembled; the output gets the assembled
    model and its masks (``assemble``).
    """
    shards = plan.arch.total_params() * DTYPE_BYTES[plan.dtype]
    work = sum(plan.stage(s).disk for s in ("windows", "statistics", "masks")) + shards
    return work, plan.stage("assemble").disk


def format_plan(plan: Plan, source: str = "") -> str:
    """The plan as the text ``topiary plan`` prints: the model, a table of stages, the settings."""
    a = plan.arch
    stats = "of the trunk and a group" if plan.expert_group else "per block"
    lines = [
        f"plan: {a.name}{f' ({source})' if source else ''}",
        f"  {a.layers} blocks, hidden {a.hidden}, intermediate {a.intermediate}, heads {a.heads} "
        f"(kv {a.kv_heads}, head_dim {a.head_dim}), vocab {a.vocab}, "
        f"{'tied' if a.tied else 'untied'} embeddings, checkpoint {a.dtype}",
        f"  params {_count(a.total_params())}; one block {_count(a.block_params())} = "
        f"{fmt_bytes(plan.block_bytes)} in {plan.dtype}; "
        f"whole model {fmt_bytes(a.total_params() * DTYPE_BYTES[plan.dtype])}",
        f"  method {plan.method}, {plan.nsamples} windows x {plan.seqlen} tokens; "
        f"device {fmt_bytes(plan.device_memory)}, host {fmt_bytes(plan.host_memory)}",
        f"  activations {fmt_bytes(plan.activation_bytes)} per buffer (x2), statistics "
        f"{fmt_bytes(plan.statistics_bytes)} {stats}",
        f"  assumed: {plan.tflops:g} TFLOP/s effective on the device, disk {plan.disk_gbps:g} GB/s "
        f"(reads and writes), {DEVICE_RESERVE:.0%} of the device kept free",
        *_experts_lines(plan),
        "",
        f"  {'stage':<11} {'device':>10} {'host':>10} {'disk':>10} {'read':>10} {'time':>9}  note",
    ]
    for s in plan.stages:
        lines.append(
            f"  {s.name:<11} {fmt_bytes(s.device):>10} {fmt_bytes(s.host):>10} {fmt_bytes(s.disk):>10} "
            f"{fmt_bytes(s.read):>10} {_time(s.seconds):>9}  {s.note}"
        )
    total = prune_seconds(plan)
    peak = max(s.device for s in plan.stages if s.name != "eval")
    lines += [
        f"  {'prune':<11} {fmt_bytes(peak):>10} {'':>10} {'':>10} {'':>10} {_time(total):>9}  "
        "(peak device, total time)",
        "",
        "settings:",
        f"  activations: {plan.activations} (2 x {fmt_bytes(plan.activation_bytes)} "
        f"{'<=' if plan.activations == 'memory' else '>'} {HOST_SHARE:.0%} of host memory)"
        if plan.activations != "none"
        else "  activations: none (magnitude reads no data)",
        f"  {'expert group' if plan.expert_group else 'block'} on the device: "
        f"{'fits' if plan.fits else 'DOES NOT FIT'} "
        f"(peak {fmt_bytes(peak)} of {fmt_bytes(plan.device_memory)})",
        f"  batch size: {plan.batch_size} windows per forward (topiary prune --batch-size {plan.batch_size})",
    ]
    if a.experts:
        lines.append(f"  expert groups: {_group_advice(plan)}")
    if plan.ignored_group:
        ignored = f"--expert-group {plan.ignored_group} ignored (a dense model has no experts)"
        lines.append(f"  expert groups: {ignored}")
    if plan.admm_precision:
        lines.append(f"  ADMM precision (auto): {plan.admm_precision} (mixed where bf16 is native)")
    if plan.gradients:
        lines.append(f"  gradients: {plan.gradients}")
    return "\n".join(lines)


def _experts_lines(plan: Plan) -> list[str]:
    """The header lines of a mixture of experts: its experts, and what one group holds."""
    a = plan.arch
    if not a.experts:
        return []
    one = a.expert_params() * DTYPE_BYTES[plan.dtype]
    held = (
        f"expert group {plan.expert_group}: the trunk and {plan.expert_group} experts = "
        f"{fmt_bytes(plan.loaded_bytes)} held at a time, each pass reading the experts once per batch"
        if plan.expert_group
        else f"the whole block held at a time ({fmt_bytes(plan.loaded_bytes)})"
    )
    return [
        f"  experts: {a.experts} per block (top {a.experts_per_token}), "
        f"one expert {_count(a.expert_params())} = {fmt_bytes(one)}; {held}"
    ]


def _group_advice(plan: Plan) -> str:
    """Which ``--expert-group`` fits the device, as the flag to pass."""
    experts, best = plan.arch.experts, plan.largest_group
    if best is None:
        return "none fits the device, not even --expert-group 1"
    asked = f"--expert-group {plan.expert_group}" if plan.expert_group else "the whole block"
    choices = [
        f"{'fits' if n == best else 'fastest'} with --expert-group {n} "
        f"({'the whole block; ' if n == experts else ''}batch {batch}, {_time(seconds)})"
        for n, (batch, seconds) in plan.group_choices.items()
    ]
    return f"{asked} {'fits' if plan.fits else 'does not fit'}; {'; '.join(choices)}"
