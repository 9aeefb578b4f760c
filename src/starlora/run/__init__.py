"""The run layer: a run's identity and random streams (`protocol`), its examples (`data`), its
directory (`store`) and the loop that drives its phases (`loop`)."""
