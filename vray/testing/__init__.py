"""The test kit: run directories without training (for serving tests) and real-shaped checkpoints (for
benchmarks). Only tests, benchmarks and the demo import it (an import-linter contract holds production to this)."""
