"""Datapath decisions in pure Python; datapath.kernel is the only part that touches the kernel."""
