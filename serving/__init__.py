"""Local engines: the demo model, vLLM process launch and supervision, GPU and host probes."""
