"""lctrain-plan: rank parallel layouts by predicted step time, with memory feasibility (``lctrain.plan.cli``)."""
