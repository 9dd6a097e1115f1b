"""trainer.sharding=fsdp: the backbone sharded across the launch's processes with PyTorch's FSDP2.

Each transformer layer is one `fully_shard` group and the whole prompted model the root, which holds
what is left (embeddings, head, final norm): at rest every process keeps 1/N of every frozen weight,
and a group is gathered only while it computes. What trains is laid out as is right for its size: an
adapter (prompt, head, LoRA, prefix) is small, so it stays whole on every process, outside FSDP, its
gradients averaged across processes as data parallelism averages them (any optimiser works on it);
model tuning trains every weight, which stays sharded and trains as DTensors, FSDP averaging their
gradients. Either way the results equal a data-parallel run's.

softprompt applies `fully_shard` itself, on CPU (gloo) as on GPUs: Accelerate's FSDP plugin engages
only with CUDA. A launch with Accelerate's FSDP config (`accelerate launch --config_file
conf/accelerate/fsdp.yaml`) asks for this sharding, and Accelerate is left to do data parallelism's
other parts (the data split, reductions).

What is saved is whole: `gathered` swaps full copies of sharded trained parameters in for the time of a
save (every process takes part; the main one writes), so `prompt/` and `checkpoint/` are the files an
unsharded run writes, and `like` shards a saved tensor back into a parameter's layout.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from transformers.modeling_layers import GradientCheckpointingLayer

from softprompt.config import TrainerConfig

FSDP = "fsdp"


def launched_with_fsdp() -> bool:
    """`accelerate launch` with an FSDP config (distributed_type: FSDP) sets this variable in every process."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def mode(trainer: TrainerConfig) -> str:
    """The sharding a run uses: trainer.sharding, or fsdp under an FSDP launch."""
    return FSDP if launched_with_fsdp() else trainer.sharding


def hand_over_from_accelerate() -> None:
    """Under an FSDP launch, keep Accelerate from applying its own FSDP (CUDA only) to a model softprompt shards."""
    os.environ.pop("ACCELERATE_USE_FSDP", None)


def transformer_layers(model: nn.Module) -> list[nn.Module]:
    """The outermost repeated blocks of the backbone (transformers marks them GradientCheckpointingLayer), else the
    classes the model names in `_no_split_modules`, the unit Accelerate's transformer wrap policy shards."""
    layers = [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]
    if not layers:
        names = {name for module in model.modules() for name in (getattr(module, "_no_split_modules", None) or [])}
        layers = [module for module in model.modules() if type(module).__name__ in names]
    inside = {id(child) for layer in layers for child in layer.modules() if child is not layer}
    return [layer for layer in layers if id(layer) not in inside]


def shard(model: nn.Module, trainer: TrainerConfig, replicated: list[nn.Parameter]) -> nn.Module:
    """Shard every transformer layer, then the root, across all processes, leaving the `replicated` parameters whole
    (see `average_gradients`); the model's `generate` gathers the root's weights as its forward does. Call after the
    trained parameters are initialised and before the optimiser exists."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    device = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device, (torch.distributed.get_world_size(),))
    # trainer.mixed_precision=bf16: weights gathered and computed in bf16, gradients reduced in fp32
    precision = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if trainer.mixed_precision == "bf16" else None, reduce_dtype=torch.float32
    )
    options = {
        "mesh": mesh,
        "reshard_after_forward": trainer.reshard_after_forward,
        "mp_policy": precision,
        "ignored_params": set(replicated),
    }
    for layer in transformer_layers(model):
        fully_shard(layer, **options)
    # the root's weights (the embeddings among them) are needed again as soon as backward starts: gathered once a step
    fully_shard(model, **{**options, "reshard_after_forward": False})
    # FSDP moves what it shards to the device; the replicated parameters go there themselves
    for parameter in replicated:
        parameter.data = parameter.data.to(mesh.device_type)
    if hasattr(model, "generate"):
        register_fsdp_forward_method(model, "generate")
        # every process runs as many decoding steps as the longest answer needs, or the gathers would not meet
        model.synced_gpus = torch.distributed.get_world_size() > 1
    return model


def average_gradients(parameters: list[nn.Parameter]) -> None:
    """The replicated parameters' gradients averaged over all processes in one reduction, as DDP averages them."""
    grads = [parameter.grad for parameter in parameters if parameter.grad is not None]
    if not grads:
        return
    flat = torch.cat([grad.flatten() for grad in grads])
    torch.distributed.all_reduce(flat)
    flat /= torch.distributed.get_world_size()
    for grad, averaged in zip(grads, flat.split([grad.numel() for grad in grads])):
        grad.copy_(averaged.view_as(grad))


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a shard (every process must call it); a plain tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def like(parameter: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """A saved tensor laid out as `parameter` is: this process's shard of a whole one, or the value as it is."""
    if isinstance(parameter, DTensor) and not isinstance(value, DTensor):
        return distribute_tensor(
            value.to(parameter.dtype), parameter.device_mesh, parameter.placements, src_data_rank=None
        )
    return value


def reshard(model: nn.Module) -> None:
    """Back to shards only: after an evaluation (no backward to free them) the gathered weights are let go, and the
    trained parameters are DTensors again, as saving and copying expect."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Full copies of the sharded trained parameters in place of their shards, for reading them whole (saving);
    every process must enter. A parameter tied to several modules is swapped in each. Nothing may compute inside."""
    wholes: dict[int, nn.Parameter] = {}
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    for module in model.modules():
        for name, parameter in list(module.named_parameters(recurse=False)):
            if not (parameter.requires_grad and isinstance(parameter, DTensor)):
                continue
            if id(parameter) not in wholes:
                wholes[id(parameter)] = nn.Parameter(parameter.full_tensor().detach())
            swapped.append((module, name, parameter))
            setattr(module, name, wholes[id(parameter)])
    try:
        yield
    finally:
        for module, name, parameter in swapped:
            setattr(module, name, parameter)
