"""What every part of emcid stands on: the loaded model (bundle, family facts, loading,
fingerprint, patch chain), token positions, hooks, weight writes, the cache, option checks,
sampling, preservation statistics. Nothing here imports requests, editors, patches or tasks.
"""
