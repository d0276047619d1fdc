"""Generation: the one sampling loop over scales (loop.py), the guidance policy (guidance.py), typed options
(options.py), image-to-image (editing.py) and the seeding plan of sampling at scale (chunks.py)."""
