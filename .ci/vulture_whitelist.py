"""Names vulture (the dead-code check in .ci/run) cannot see used: read it as a list of reasons.

Run: ``python -m vulture gradflow .ci/vulture_whitelist.py --min-confidence 60``. A name
belongs here only when something outside gradflow's own code calls it; dead code is deleted.
"""
# a file of names, never imported: vulture counts each name below as used

# Public API: called by users, notebooks and the tests, not by gradflow itself.
GradflowTrainerCallback    # gradflow.integrations.hf
GradflowCallback           # gradflow.integrations.lightning
gradient_heatmap           # gradflow.plot
decay_rate_over_training   # gradflow.plot
ResidualModule             # gradflow.tracing.parts: the unit protocol, for type checkers
log_spaced                 # gradflow.tracing.schedule
JSONLSink                  # gradflow.tracing.sinks
_.frame            # UnitList.frame(): the listing as a DataFrame
_.next_step        # Tracer.next_step(): closes a step by hand

# Called by frameworks: Lightning and Hugging Face callback hooks, argparse, nn.Module, NamedTuple.
_.on_train_begin
_.on_train_end
_.on_fit_start
_.on_train_batch_start
_.on_fit_end
_.on_exception
_.error            # argparse.ArgumentParser.error, overridden for one-line errors and exit code 2
_.extra_repr       # nn.Module's repr
__new__            # tracing/fxgraph.py
forward_is_parts   # read by tracing/check.py through getattr on the class
already_finished   # RunOutcome field, read by callers of run_training
components         # PathResult field, read by users (keep=True)

# Arguments a signature must take (hooks, signal handlers, patched forwards, __exit__).
self_module
frame
exc
control
batch_idx
exception

# Owned by another change in flight (gradflow/tracing/stats.py): dead, to delete there.
dot                        # gradflow.tracing.stats.dot

# Registered entry points: found by name through the registry (create_model), never called directly.
resnet20; resnet32; resnet44; resnet56; resnet110; resnet164; resnet1001; resnet1202  # noqa
plain20; plain32; plain44; plain56; plain110  # noqa
gpt_tiny; gpt_small; gpt_medium; vit_cifar_tiny; vit_cifar_small  # noqa

# Read by the tests and documented: public names and counters.
mahonian           # gradflow.experiments.stats: the ordering test's exact distribution (tests check it)
MF_EXPONENT        # gradflow.theory.total: the mean-field exponent, documented in docs/theory.md
_.collectives      # the gather's collective count (tests and benchmarks/ddp_bench.py read it)
PLAIN              # gradflow.tracing.parts: the runner without a tracer (documented there)
exit_shortcut      # a run-time unit site's field (dataclass field, part of the recorded site)
