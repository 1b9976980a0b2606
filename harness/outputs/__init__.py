"""Files a trained model writes: prediction PNGs and the test-server zip, image panels, plots."""
