"""The figure functions: gradflow's tables in, matplotlib Figures out (paper style; nothing written).

Every function takes tables as gradflow writes them (``tr.units``,
``tr.samples``, a run's log or ``probe.csv``; see :mod:`gradflow.runs.read`) and
returns a :class:`matplotlib.figure.Figure`. Nothing here writes files or
changes global matplotlib state: each figure is drawn inside one seaborn
style context (:func:`style`), so a notebook's own settings are left alone.

Several configurations are passed either as a dict ``{label: table}`` or as one
table with a ``config`` column (``by=`` names another column); each gets its
own panel, in the order given.

Units on the figures: gradient "ratios" are ||dE/dx_l|| / ||dE/dx_L||, so x_L
(the head's input) is 1 by definition; the total on the depth figures is the
ratio of batch medians (docs/theory.md, section 5); the direct term is dE/dx_L
carried back through shortcuts and after-addition activations only; eq. (5)/(8)
points are drawn only at the units they cover
(:func:`gradflow.theory.predict_direct`), beside the isotropy and mean-field
predictions of the total (docs/theory.md, section 3). Decay rates are changes of log(ratio)
per unit toward the input (positive: grows toward the input).

Sizes: every figure is laid out with constrained layout and sized so that a
plain ``fig.savefig(path)`` holds its titles and legends whole; long titles are
wrapped to the figure's width. Vertical lines mark where the signal changes
shape (the projection shortcuts), between the last unit that reads the old
shape and the first that reads the new one.
"""
from gradflow.plot.style import COLOURS, MIN_W, PANEL_H, PANEL_W, Records, shape_changes, style
from gradflow.plot.depth import (activation_growth, cosine_distribution, decay_rate_table, decay_rates,
                                 gradient_depth, linear_growth_fit, probe_overview)
from gradflow.plot.training import (decay_rate_over_training, decay_rate_over_training_table, gradient_flow_over_training,
                                    gradient_heatmap, heatmap_table, training_curve_panels, training_curves)
from gradflow.plot.paths import (contribution_by_length, contribution_over_training, gradient_per_length, lesion_curves,
                                 path_length_distribution, spectrum_by_unit)
