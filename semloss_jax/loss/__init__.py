"""The math of METHOD.md: semantic cost, EMD and its bounds, exact OT reference, training
objectives."""
