from .reference import ACTIVATIONS, apply_activation, rep_conv_reference  # noqa: F401
