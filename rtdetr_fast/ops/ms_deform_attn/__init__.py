from .reference import ms_deform_attn_reference  # noqa: F401
# registering the native and Triton backends loads neither the extension nor triton
from . import native, triton  # noqa: F401,E402
