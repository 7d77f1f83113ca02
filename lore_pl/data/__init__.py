"""Layer 2: preference splits, text embedding, the feature cache, basis files and atomic writes."""
