"""What a checkpoint keeps of a policy: the weights that train, never the frozen ones the base
model already holds (a frozen trunk's blocks, LoRA's base weights)."""

from torch import Tensor, nn


def get_trained_state(module: nn.Module) -> dict[str, Tensor]:
    """The module's `state_dict` without its frozen parameters (what a checkpoint keeps)."""
    frozen = {name for name, param in module.named_parameters() if not param.requires_grad}
    return {name: value for name, value in module.state_dict().items() if name not in frozen}


def load_trained_state(module: nn.Module, state: dict[str, Tensor]):
    """Load `get_trained_state`'s output (or a whole `state_dict`) into a module built the same
    way (the same base model, trainable layers and adapters): only frozen parameters, which the
    base model already holds, may be missing."""
    frozen = {name for name, param in module.named_parameters() if not param.requires_grad}
    missing, unexpected = module.load_state_dict(state, strict=False)
    if unexpected or set(missing) - frozen:
        raise ValueError(
            f"The saved policy does not fit this model (unexpected {sorted(unexpected)[:4]}, "
            f"missing {sorted(set(missing) - frozen)[:4]}): build it with the run's own "
            "base_model, trainable_layers and LoRA settings (its run.json).")
