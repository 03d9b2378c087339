"""Fast paths of model.py that are not the method: torch.library custom ops and hand-written autograd
Functions, each computing what a plain expression in model.py computes (tests/test_model.py checks each
against its plain path). model.py chooses them, one commented line each; its timings are in docs/results.md."""
