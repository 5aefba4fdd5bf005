"""Experiments that measure the method rather than train a product model.

two_moon: the paper's TwoMoon toy (section 3.1, Figure 2): data, network and
  single runs; `python experiment.py two_moon` runs two_moon_protocol.
two_moon_protocol: every method (Algorithm 1 with UDA, its UDA-only control,
  MPL without UDA, Pseudo Labels, supervised, the ceiling) tuned alike on
  disjoint seeds; two_moon_trainers: the compiled trainers it reuses.
two_moon_tuning: a grid over what sets the feedback's strength on TwoMoon.
ablation: the disputed choices of MplConfig, each varied alone, over seeds,
  on TwoMoon and on the offline digits through mpl_tf.train.run.
report: renders docs/results.md's tables from the experiments' JSON.
checks: the value checks every experiment config runs before it trains.
"""
