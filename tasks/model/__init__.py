"""Model phase: the zoo, the optimisation recipe, the train and convert stages, exporters."""
