"""`k2serve serve --ray --endpoints-file endpoints.toml`: what dedicated endpoints may run on
(hardware, with the operator's price), which models they may deploy, and how they scale.

    [scaling]                       # Ray Serve's autoscaling, as k2serve sets it
    target_ongoing_requests = 2     # per replica; more and Serve adds replicas
    upscale_delay_s = 10
    downscale_delay_s = 120
    start_timeout_s = 120           # a request waiting for a replica (scale from zero)
    meter_interval_s = 60           # replica time is billed at this interval
    lease_s = 10                    # servers sharing a database: one acts, another takes
                                    # over this long after it stops renewing

    [[hardware]]
    id = "8x_nvidia_h100_80gb_sxm"  # Together's id format: <count>x_nvidia_<gpu>_<mem>gb_<link>
    cents_per_minute = 2400         # the operator's price per replica-minute
    num_gpus = 8
    num_cpus = 16
    accelerator_type = "H100"       # Ray's accelerator_type resource (placement)
    gpu_type = "h100-80gb"
    gpu_memory = 80
    gpu_link = "sxm"

    [[models]]
    id = "moonshotai/Kimi-K2-Instruct-0905"
    engine = "vllm"                 # one vLLM process per replica; or "k2serve" (our engine)
    path = "/models/Kimi-K2-Instruct-0905"   # checkpoint (vLLM's --model; our tokenizer)
    vllm_args = ["--tensor-parallel-size", "8", "--enable-expert-parallel",
                 "--max-model-len", "131072"]
    price_input = 0.0               # USD per 1M tokens on top of the minutes (default 0)
    price_output = 0.0

Without a file: one CPU hardware (`cpu_1core`, free) and the embedded model on our engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import tomllib

from k2serve.serving.catalog import EMBEDDED_CHAT_MODEL_ID

ENGINES = ("k2serve", "vllm")


@dataclass(frozen=True)
class Hardware:
    id: str
    cents_per_minute: float = 0.0
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    accelerator_type: str | None = None
    gpu_type: str = "cpu"
    gpu_memory: float = 0.0
    gpu_link: str = "none"
    memory_gb: float | None = None  # Ray's `memory` resource a replica reserves
    # A replica larger than one node (K2 on 2 x 8 GPUs): its actor holds CPUs only, and its
    # vLLM places the GPUs itself (`--distributed-executor-backend ray`: a placement group
    # over the nodes of this cluster).
    spans_nodes: bool = False

    def actor_options(self) -> dict[str, Any]:
        """The replica actor's Ray resources."""
        if self.spans_nodes:
            return {"num_cpus": self.num_cpus, "num_gpus": 0}
        options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.accelerator_type:
            options["accelerator_type"] = self.accelerator_type
        if self.memory_gb:
            options["memory"] = int(self.memory_gb * (1 << 30))
        return options

    def as_object(self, updated_at: str, availability: str | None = None) -> dict[str, Any]:
        """Together's HardwareWithStatus."""
        obj: dict[str, Any] = {
            "object": "hardware", "id": self.id,
            "pricing": {"cents_per_minute": self.cents_per_minute},
            "specs": {"gpu_type": self.gpu_type, "gpu_link": self.gpu_link,
                      "gpu_memory": self.gpu_memory, "gpu_count": int(self.num_gpus)},
            "updated_at": updated_at}
        if availability is not None:
            obj["availability"] = {"status": availability}
        return obj


@dataclass(frozen=True)
class DedicatedModel:
    id: str
    engine: str = "k2serve"
    path: str | None = None  # None: the embedded GGUF (k2serve engine only)
    tokenizer: str | None = None  # default: path
    vllm_args: tuple[str, ...] = ()
    context_length: int | None = None  # default: vLLM's --max-model-len, or the checkpoint's
    max_num_seqs: int | None = None  # our engine's batch; vLLM: in vllm_args
    # Token prices (USD per 1M) on top of the hardware's minutes; default 0: the replica
    # time is the whole bill.
    price_input: float = 0.0
    price_output: float = 0.0


@dataclass(frozen=True)
class Scaling:
    target_ongoing_requests: float = 2.0
    max_ongoing_requests: int = 8
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 120.0
    metrics_interval_s: float = 2.0
    look_back_period_s: float = 10.0
    start_timeout_s: float = 120.0
    meter_interval_s: float = 60.0  # how often replica-minutes are billed
    inactive_unit_s: float = 60.0  # one minute of `inactive_timeout` (tests shorten it)
    lease_s: float = 10.0  # servers sharing a database: a dead manager's lease lasts this

    def autoscaling_config(self, min_replicas: int, max_replicas: int) -> dict[str, Any]:
        return {"min_replicas": min_replicas, "max_replicas": max_replicas,
                "initial_replicas": max(min_replicas, 1) if max_replicas else None,
                "target_ongoing_requests": self.target_ongoing_requests,
                "upscale_delay_s": self.upscale_delay_s,
                "downscale_delay_s": self.downscale_delay_s,
                "downscale_to_zero_delay_s": self.downscale_delay_s,
                "metrics_interval_s": self.metrics_interval_s,
                "look_back_period_s": self.look_back_period_s}


@dataclass(frozen=True)
class DedicatedConfig:
    hardware: tuple[Hardware, ...] = (Hardware("cpu_1core"),)
    models: tuple[DedicatedModel, ...] = (DedicatedModel(EMBEDDED_CHAT_MODEL_ID),)
    scaling: Scaling = field(default_factory=Scaling)

    def find_hardware(self, hardware_id: str) -> Hardware | None:
        return next((h for h in self.hardware if h.id == hardware_id), None)

    def find_model(self, model_id: str) -> DedicatedModel | None:
        return next((m for m in self.models if m.id == model_id), None)


def _typed(raw: dict, key: str, kind, where: str, default=None):
    value = raw.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise ValueError(f"{where}: '{key}' has the wrong type ({type(value).__name__})")
    return value


def _check_keys(raw: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown keys {', '.join(unknown)}")


def _max_model_len(args: list[str]) -> int | None:
    """vLLM's `--max-model-len N` (or `=N`) in its arguments, when a plain integer."""
    for i, arg in enumerate(args):
        value = None
        if arg == "--max-model-len" and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith("--max-model-len="):
            value = arg.partition("=")[2]
        if value is not None and value.isdigit():
            return int(value)
    return None


def read_dedicated_config(path: str | None) -> DedicatedConfig:
    """The file's settings (None: the defaults); ValueError naming the entry and key."""
    if path is None:
        return DedicatedConfig()
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"cannot read the endpoints file {path}: {exc}") from None
    _check_keys(doc, {"scaling", "hardware", "models"}, path)
    number = (int, float)
    raw_scaling = doc.get("scaling", {})
    _check_keys(raw_scaling, set(Scaling.__dataclass_fields__), f"{path}: [scaling]")
    scaling = Scaling(**{k: _typed(raw_scaling, k, number if k != "max_ongoing_requests" else int,
                                   f"{path}: [scaling]") for k in raw_scaling})
    hardware = []
    for i, raw in enumerate(doc.get("hardware", [])):
        where = f"{path}: hardware[{i}]"
        _check_keys(raw, set(Hardware.__dataclass_fields__), where)
        hw_id = _typed(raw, "id", str, where)
        if not hw_id:
            raise ValueError(f"{where}: 'id' is required")
        values = {k: _typed(raw, k, str if k in ("accelerator_type", "gpu_type", "gpu_link")
                            else bool if k == "spans_nodes" else number, where)
                  for k in raw if k != "id"}
        if any(isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0
               for v in values.values()):
            raise ValueError(f"{where}: numbers must not be negative")
        hardware.append(Hardware(hw_id, **values))
    models = []
    for i, raw in enumerate(doc.get("models", [])):
        where = f"{path}: models[{i}]"
        _check_keys(raw, set(DedicatedModel.__dataclass_fields__), where)
        model_id = _typed(raw, "id", str, where)
        engine = _typed(raw, "engine", str, where, "k2serve")
        if not model_id:
            raise ValueError(f"{where}: 'id' is required")
        if engine not in ENGINES:
            raise ValueError(f"{where}: engine must be one of {', '.join(ENGINES)}")
        model_path = _typed(raw, "path", str, where)
        if engine == "vllm" and not model_path:
            raise ValueError(f"{where}: a vllm model needs 'path' (its checkpoint)")
        args = _typed(raw, "vllm_args", list, where, [])
        if not all(isinstance(a, str) for a in args):
            raise ValueError(f"{where}: 'vllm_args' must be a list of strings")
        prices = [_typed(raw, k, number, where, 0.0) for k in ("price_input", "price_output")]
        if any(p < 0 for p in prices):
            raise ValueError(f"{where}: prices must not be negative")
        context = _typed(raw, "context_length", int, where)
        if context is None and engine == "vllm":  # the front checks prompts against vLLM's
            context = _max_model_len(args)
        models.append(DedicatedModel(
            model_id, engine, model_path, _typed(raw, "tokenizer", str, where), tuple(args),
            context, _typed(raw, "max_num_seqs", int, where), float(prices[0]),
            float(prices[1])))
    defaults = DedicatedConfig()
    return DedicatedConfig(tuple(hardware) or defaults.hardware,
                           tuple(models) or defaults.models, scaling)
