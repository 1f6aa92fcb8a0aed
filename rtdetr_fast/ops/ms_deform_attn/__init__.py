from .reference import ms_deform_attn_reference  # noqa: F401
