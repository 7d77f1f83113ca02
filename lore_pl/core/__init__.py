"""Layer 1: the LoRe math, the fused CPU kernel, the model object and the few-shot solver.

Nothing here imports Lightning or reads files (the kernel compiles itself into a cache on first use).
"""
