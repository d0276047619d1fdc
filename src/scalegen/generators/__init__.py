from .attention import AdaLNBeforeHead, AdaLNBlock, SelfAttention, modulate
from .backbone import AdaLNTransformer
from .generator import Generator, init_var_weights

__all__ = ["AdaLNBeforeHead", "AdaLNBlock", "AdaLNTransformer", "Generator", "SelfAttention", "init_var_weights", "modulate"]
