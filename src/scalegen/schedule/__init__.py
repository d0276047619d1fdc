"""The scale schedule and how per-scale targets compose: sizes, offsets, masks (scales.py); residual (VAR), direct
(FlowAR) and per-scale VQ (FlexVAR) compositions, each owning the run's schedule; running on another schedule
(anyscale.py)."""
