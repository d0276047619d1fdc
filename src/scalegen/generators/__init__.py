from scalegen.generators.attention import AdaLNBeforeHead, AdaLNBlock, SelfAttention, modulate
from scalegen.generators.backbone import AdaLNTransformer
from scalegen.generators.generator import Generator, init_var_weights
from scalegen.generators.mamba2 import Mamba2
from scalegen.generators.mvar import MambaAdaLNBlock, MambaAdaLNTransformer

__all__ = ["AdaLNBeforeHead", "AdaLNBlock", "AdaLNTransformer", "Generator", "Mamba2", "MambaAdaLNBlock",
           "MambaAdaLNTransformer", "SelfAttention", "init_var_weights", "modulate"]
