"""How the model is held and computed: the dtype the base is loaded in, 4-bit quantization (QLoRA), the attention
kernel, and for training autocast, gradient checkpointing and the optimizer.

model.precision and model.quantization change what the trained weights mean, so they are run identity (runs.py);
the others change only how a step is computed and are hyperparameters (manifest.hyperparameters).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..config import Config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_base(config: Config, path: str):
    """The model at `path` in model.precision with model.attn_implementation, 4-bit nf4 under QLoRA."""
    from transformers import AutoModelForCausalLM

    m = config.model
    dtype = DTYPES[m.precision]
    kwargs = {"dtype": dtype, "attn_implementation": m.attn_implementation}
    if m.quantization == "nf4":
        from transformers import BitsAndBytesConfig

        # The QLoRA recipe: nf4 with double quantization, computing in the load dtype. Part of the run identity.
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True,
                                                           bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.config.use_cache = False
    if m.quantization != "none":
        from peft import prepare_model_for_kbit_training

        # Freezes the base and keeps its unquantized parts (norms, embeddings, head) in fp32. Gradient
        # checkpointing is the Trainer's to switch on, as without quantization.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        _keep_4bit_layout(model)
    return model


def _keep_4bit_layout(model) -> None:
    """Keep bitsandbytes from repacking 4-bit weights for CPU inference. On a CPU with AVX512-BF16, the first
    forward in eval mode without gradients (an evaluation, a sample, the packing probe) converts each layer's
    weights in place to an inference-only layout, after which training computes no gradient at all, silently
    (bitsandbytes 0.50; found by a resume test, see tests/train/test_precision.py)."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def build_model(config: Config, model_path: str, resume_dir: Path | None, load=load_base):
    """Base model plus a fresh (seeded) or restored adapter; for full fine-tuning, the restored weights. `load`
    reads the base (sharding.load_model: sharded across the ranks under distributed.strategy = "fsdp")."""
    from transformers.trainer_utils import set_seed

    if config.adapter.method == "full":
        return load(config, str(resume_dir or model_path))
    from peft import LoraConfig, PeftModel, get_peft_model

    base = load(config, model_path)
    if resume_dir is not None:
        return PeftModel.from_pretrained(base, str(resume_dir), is_trainable=True)
    set_seed(config.training.seed)  # LoRA's random A matrices depend on it
    lora = LoraConfig(r=config.adapter.r, lora_alpha=config.adapter.alpha, lora_dropout=config.adapter.dropout,
                      target_modules=list(config.adapter.target_modules), bias=config.adapter.bias,
                      task_type="CAUSAL_LM")
    return get_peft_model(base, lora)


def trainer_arguments(config: Config, arguments_class) -> dict:
    """TrainingArguments for training.mixed_precision, gradient_checkpointing, deterministic and optimizer."""
    t = config.training
    args: dict = {}
    if t.mixed_precision != "no":
        args[t.mixed_precision] = True  # autocast; the weights and the optimizer stay in their own dtype
        if not torch.cuda.is_available():
            args["use_cpu"] = True  # the Trainer accepts bf16 without a GPU only when told it is on CPU
    if t.gradient_checkpointing:
        # Non-reentrant checkpointing (PEFT's frozen inputs need no requires_grad trick) restores the RNG for the
        # recomputation and forks it, so dropout masks and the RNG stream equal those of a run without it.
        name = "activation_checkpointing" if hasattr(arguments_class, "activation_checkpointing") \
            else "gradient_checkpointing"  # earlier transformers releases know only the old name
        args[name] = True
        args[f"{name}_kwargs"] = {"use_reentrant": False}
    if t.deterministic:
        # torch.use_deterministic_algorithms, cuDNN deterministic, a fixed cuBLAS workspace (the Trainer's own
        # switch). Without it, GPU kernels that reduce in a varying order (atomics) make law 3 hold only within
        # floating-point nondeterminism; CPU kernels are deterministic either way.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # before the first cuBLAS handle exists
        args["full_determinism"] = True
    if t.optimizer == "adamw_8bit":
        args["optim"] = "adamw_bnb_8bit"
    # adamw_torch is the Trainer's default: torch's AdamW (its fused kernel where torch has one), as before.
    return args
