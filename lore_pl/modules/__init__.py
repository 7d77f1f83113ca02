"""Layer 3: the LightningModules (phase 1, phase 2, scoring, embedding), metrics and checkpoint IO."""
