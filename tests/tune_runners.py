"""Candidate runners for the autotuner tests, imported by the measuring process by name
("py:tune_runners:<factory>"). Each factory takes (program, candidate) and returns run(bc)."""
import os
import time

from recurkit.ir.interpret import run_reference


def _delay(cand):
    return float(cand.knob_dict.get("delay", 0.0))


def good(program, cand):
    def run(bc):
        time.sleep(_delay(cand))
        return run_reference(bc)
    return run


def wrong(program, cand):     # fast and 1% off: must never win
    def run(bc):
        o, s = run_reference(bc)
        return o * 1.01, s
    return run


def crash(program, cand):     # kills the process it runs in
    def run(bc):
        os._exit(3)
    return run


def hang(program, cand):
    def run(bc):
        time.sleep(600)
    return run


def raises(program, cand):
    raise RuntimeError("this candidate does not compile")
