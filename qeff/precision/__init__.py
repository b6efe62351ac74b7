"""Precision tiers: the accelerator's number formats (fp16, OCP MX) emulated on the CPU."""
