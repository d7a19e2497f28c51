"""`hydra/sweeper=vit_optuna`: Optuna searches for `vit-train -m` (the `.[optuna]` extra)."""
