"""deepzero applications and the ``deepzero`` command's dispatcher."""
