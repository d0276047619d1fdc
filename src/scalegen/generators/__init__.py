from .attention import AdaLNBeforeHead, AdaLNBlock, SelfAttention, modulate
from .backbone import AdaLNTransformer
from .generator import Generator, init_var_weights
from .mamba2 import Mamba2
from .mvar import MambaAdaLNBlock, MambaAdaLNTransformer

__all__ = ["AdaLNBeforeHead", "AdaLNBlock", "AdaLNTransformer", "Generator", "Mamba2", "MambaAdaLNBlock",
           "MambaAdaLNTransformer", "SelfAttention", "init_var_weights", "modulate"]
