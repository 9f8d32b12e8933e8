"""Scene-side logic of the DoseDiff module (no Qt), testable with slicer-core."""
