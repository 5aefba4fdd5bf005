"""Experiments that measure the method rather than train a product model.

two_moon: the paper's TwoMoon toy (section 3.1, Figure 2): supervised vs
  Pseudo Labels vs Meta Pseudo Labels, with the library's MplStep.
ablation: the disputed choices of MplConfig, each varied alone, over seeds,
  on TwoMoon and on the offline digits through mpl_tf.train.run.
"""
