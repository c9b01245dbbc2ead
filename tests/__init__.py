"""Test suite: unit/ (no process group), distributed/ (gloo under torchrun), gpu/ (auto-skip), integration/."""
