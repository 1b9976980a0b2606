"""The words of a run's starting-weights status, as its record and MLflow tags give it: written where a model is
filled (harness.models.weights), read by the table's counting rule (harness.report.verdicts), which must not need
PyTorch to read them."""

from __future__ import annotations

RANDOM = "random (none expected)"  # the row names no file: it trains from random weights by design
LOADED = "loaded"  # "loaded <file>", with " (checksum ok)" where a published checksum matches
OTHER = "other"  # "other <file> (...)": a file of the expected name whose checksum is not the published one
MISSING = "missing"  # "missing <files>": the row's file is not there; the run started from random weights
META = "meta"  # a meta-device model, built only to measure shapes: nothing to fill
