"""A/B tests on endpoints with traffic plans: the statistics they are judged by
(:mod:`app.experiments.stats`: fixed-horizon, sequential mSPRT, Bayesian, sample ratio
mismatch and Holm), kept free of Ray and of the store so every number can be unit-tested."""
